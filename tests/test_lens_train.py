"""`lens-train`: a tuned lens for any checkpoint, on general text, with its held-out evaluation, a
fingerprint of the weights it was fitted to, and lenses saved by the tuned-lens package."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffmamba_interp import load_model
from diffmamba_interp.analysis.lens import TunedLens, logit_lens
from diffmamba_interp.cli import app
from diffmamba_interp.errors import DiffMambaError

runner = CliRunner()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, perturb):
    """A transformers Mamba-2 checkpoint with a small BPE tokenizer trained on general text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Mamba2Config, Mamba2ForCausalLM, PreTrainedTokenizerFast

    from diffmamba_interp.analysis.lens_training import general_text

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([general_text()[:200_000]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    hf = perturb(Mamba2ForCausalLM(Mamba2Config(vocab_size=len(tok), hidden_size=32, state_size=8, num_hidden_layers=2,
                                                head_dim=16, num_heads=4, expand=2, n_groups=1, chunk_size=16)))
    path = tmp_path_factory.mktemp("hf-mamba2")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_lens_train_on_a_transformers_checkpoint_with_general_text(hf_checkpoint):
    args = ["lens-train", "--ckpt", hf_checkpoint, "--steps", 4, "--batch", 2, "--seq-len", 32, "--eval-n", 3, "-q"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "kl_tuned_all" in result.output and "kl_logit_answer" in result.output
    meta = json.loads((hf_checkpoint / "tuned_lens.json").read_text())
    assert meta["train"]["optimizer"] == "sgd" and meta["train"]["steps"] == 4 and meta["fingerprint"]["sha256"]
    rows = meta["evaluation"]
    assert [r["layer"] for r in rows] == [0, 1, 2] and [r["paper_layer"] for r in rows] == [None, 0, 1]
    assert rows[-1]["kl_tuned_all"] == pytest.approx(0, abs=1e-5) and rows[-1]["kl_logit_all"] == pytest.approx(0, abs=1e-5)
    assert all(r["kl_logit_all"] >= -1e-6 and r["kl_tuned_answer"] >= -1e-6 for r in rows)  # KL ≥ 0 up to rounding
    model = load_model(hf_checkpoint)
    lens = TunedLens.load(hf_checkpoint, model)  # the fingerprint matches these weights
    assert lens.evaluation == rows
    again = runner.invoke(app, [str(a) for a in args])  # a lens is never replaced silently
    assert again.exit_code == 2 and "--force" in again.output


def test_a_lens_refuses_other_weights(hf_checkpoint, tmp_path):
    model = load_model(hf_checkpoint)
    lens = TunedLens(model)
    lens.save(tmp_path)
    TunedLens.load(tmp_path, model)
    other = load_model(hf_checkpoint)
    with torch.no_grad():
        other.blocks[0].mixer.D.add_(1.0)
    with pytest.raises(DiffMambaError, match="fitted to other weights"):
        TunedLens.load(tmp_path, other)
    TunedLens.load(tmp_path, model.to(torch.float64))  # the same weights in another dtype are accepted
    assert isinstance(TunedLens.load(tmp_path, other, check_fingerprint=False), TunedLens)


def test_reads_a_lens_saved_by_the_tuned_lens_package(hf_checkpoint, tmp_path):
    """tuned-lens writes config.json + params.pt with translators `{i}.weight/bias` for HF hidden_states[i],
    which for Mamba is the residual after block i: our layer i + 1."""
    model = load_model(hf_checkpoint)
    d, n = model.cfg.d_model, model.cfg.n_layers
    g = torch.Generator().manual_seed(0)
    state = {f"{i}.{p}": torch.randn(*((d, d) if p == "weight" else (d,)), generator=g) * 0.1 for i in range(n) for p in ("weight", "bias")}
    torch.save(state, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({"base_model_name_or_path": "x", "d_model": d, "num_hidden_layers": n,
                                                       "bias": True, "lens_type": "linear_tuned_lens"}))
    lens = TunedLens.load(tmp_path, model)
    assert lens.layers == [1, 2] and lens.translator(0) is None
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=g)
    _, cache = model.run_with_cache(ids)
    h = cache["blocks.0.hook_resid_post"]  # our layer 1 = HF hidden_states[0]
    expected = model.unembed(h + h @ state["0.weight"].T + state["0.bias"])
    torch.testing.assert_close(lens(h, 1, model), expected)
    torch.testing.assert_close(lens.log_probs(model, ids)[0], logit_lens(model, ids)[0])  # layer 0: identity


def test_the_snr_report_shows_the_lens_evaluation(hf_checkpoint, tmp_path):
    from diffmamba_interp.jobs import run_snr

    if not (hf_checkpoint / "tuned_lens.json").exists():
        runner.invoke(app, ["lens-train", "--ckpt", str(hf_checkpoint), "--steps", "2", "--batch", "2", "--seq-len", "32",
                            "--eval-n", "2", "-q"])
    run = run_snr([str(hf_checkpoint)], data="babi:qa1", n=3, lens="tuned", progress=False)
    kl = run.lens_evaluation()
    assert list(kl.columns[:3]) == ["model", "layer", "paper_layer"] and len(kl) == 3
    html = run.write_report(tmp_path / "r.html").read_text()
    assert "held-out KL" in html and "kl_tuned_answer" in html
