"""Logit lens, tuned lens and branch lens on tiny random models (docs/conventions.md, "Lens and SNR")."""

import json

import pytest
import torch
import torch.nn.functional as F

from diffmamba_interp.analysis.branch_lens import branch_lens
from diffmamba_interp.analysis.lens import LogitLens, TunedLens, logit_lens
from diffmamba_interp.analysis.lens_training import token_stream, train_tuned_lens
from diffmamba_interp.config import ARCHS
from diffmamba_interp.errors import DiffMambaError

TEXTS = [
    "Mary went to the kitchen . John moved to the garden . Where is Mary ? kitchen",
    "Sandra travelled to the office . Daniel went to the bathroom . Where is Daniel ? bathroom",
    "John went to the hallway . Mary moved to the bedroom . Where is John ? hallway",
    "Daniel travelled to the garden . Sandra went to the kitchen . Where is Sandra ? kitchen",
]
HELD_OUT = "Mary moved to the office . Daniel went to the hallway . Where is Mary ? office"


@pytest.fixture(scope="module")
def make_model(tiny_model):
    """A tiny perturbed model of this module's sizes (float64 unless dtype is given)."""

    def make(arch="diffmamba2", n_layers=3, vocab=50, d_model=32, seed=0, dtype=torch.float64, diff_layers="alternate"):
        return tiny_model(arch, seed=seed, dtype=dtype, d_model=d_model, n_layers=n_layers, vocab_size=vocab, head_dim=16,
                          d_state=8, diff_layers=diff_layers, chunk_size=256, d_conv=4).train()

    return make


# -- logit lens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_logit_lens_and_direct_logits(make_model, arch):
    """Per arch: the last lens layer is the model's own log_softmax, and the embedding's and every
    block's direct logit contributions (branch lens, frozen final-norm scale) sum to the logit."""
    model = make_model(arch)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    lp = logit_lens(model, ids)
    assert lp.shape == (model.cfg.n_layers + 1, 2, 6, 50)
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(lp[-1], F.log_softmax(logits, -1), atol=1e-5, rtol=0)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(()).double())

    targets = [4, 17]
    df = branch_lens(model, ids, targets, include_embed=True, progress=False)
    assert list(df.columns) == ["example", "layer", "component", "value"]
    for ex, t in enumerate(targets):
        d = df[(df.example == ex) & df.component.isin(["embed", "block"])]
        assert sorted(d.layer) == list(range(-1, model.cfg.n_layers))
        assert abs(d.value.sum() - float(logits[ex, -1, t])) < 1e-5
    diff_layers = set(df[df.component == "mixer_1"].layer)
    expected = set(model.cfg.diff_layer_indices) if arch in ("diffmamba1", "diffmamba2") else set()
    assert diff_layers == expected  # plain and Diff-S6 blocks get a "block" row only


def test_layer0_is_embeddings_and_layer_k_is_resid_post(make_model):
    model = make_model("mamba2")
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    lp = logit_lens(model, ids)
    _, cache = model.run_with_cache(ids)
    with torch.no_grad():
        emb = F.log_softmax(model.unembed(model.embed(ids)), -1)
        mid = F.log_softmax(model.unembed(cache["blocks.0.hook_resid_post"]), -1)
    torch.testing.assert_close(lp[0], emb, atol=1e-10, rtol=0)
    torch.testing.assert_close(lp[1], mid, atol=1e-10, rtol=0)
    assert not torch.allclose(lp[0], lp[1])  # the block changed something


def test_positions_select_columns_of_the_full_lens(make_model):
    model = make_model("mamba2")
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(3))
    full = logit_lens(model, ids)
    some = logit_lens(model, ids, positions=[-1, 0, 3])
    assert some.shape == (4, 3, 3, 50)
    torch.testing.assert_close(some, full[:, :, [6, 0, 3]], atol=1e-12, rtol=0)
    with pytest.raises(DiffMambaError, match="position 7"):
        logit_lens(model, ids, positions=7)


def test_lens_forward_needs_a_model_and_valid_layer(make_model):
    model = make_model("mamba1")
    h = torch.randn(2, 32, dtype=torch.float64)
    with pytest.raises(DiffMambaError, match="no model"):
        LogitLens()(h, 0)
    with pytest.raises(DiffMambaError, match="out of range"):
        LogitLens(model)(h, 4)
    torch.testing.assert_close(LogitLens()(h, 1, model), model.unembed(h))


# -- tuned lens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["diffmamba2", "diffs6"])
def test_tuned_lens_at_init_is_logit_lens(make_model, arch):
    model = make_model(arch)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    lens = TunedLens(model)
    assert len(lens.translators) == model.cfg.n_layers  # layer n_layers is the identity
    assert all(float(p.abs().sum()) == 0 for p in lens.parameters())
    torch.testing.assert_close(lens.log_probs(model, ids), logit_lens(model, ids), atol=1e-12, rtol=0)


def test_tuned_lens_train_deterministic_and_beats_logit_lens(make_model, tokenizer):
    model = make_model("diffmamba2", n_layers=2, vocab=len(tokenizer), seed=5, dtype=torch.float32)
    kw = dict(lr=2e-2, batch=4, seq_len=12, optimizer="adam", progress=False, tokenizer=tokenizer)
    a = train_tuned_lens(model, TEXTS, steps=20, seed=0, **kw)
    b = train_tuned_lens(model, TEXTS, steps=20, seed=0, **kw)
    c = train_tuned_lens(model, TEXTS, steps=2, seed=1, **kw)
    a2 = train_tuned_lens(model, TEXTS, steps=2, seed=0, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    s2 = a2.state_dict()
    assert any(not torch.equal(s2[k], sc[k]) for k in sa)  # another seed reads other windows
    assert a.history == b.history and len(a.history) == 20 and a.history[:2] == a2.history
    assert a.history[-1] < a.history[0]
    # the model is frozen
    assert all(p.grad is None for p in model.parameters())
    held = torch.tensor([tokenizer.encode(HELD_OUT, add_special_tokens=False)])
    kl_tuned = a.kl_to_final(model, held)
    kl_logit = LogitLens(model).kl_to_final(model, held)
    assert kl_tuned.shape == (3,)
    assert (kl_tuned[:-1] < kl_logit[:-1]).all()  # every translated layer is closer to the output
    assert abs(float(kl_tuned[-1])) < 1e-5 and abs(float(kl_logit[-1])) < 1e-5  # last layer = model


def test_token_stream_sources(tokenizer, tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXTS[0], encoding="utf-8")
    from_file = token_stream(path, tokenizer)
    assert from_file.tolist() == tokenizer.encode(TEXTS[0], add_special_tokens=False)
    joined = token_stream(TEXTS[:2], tokenizer)
    n0 = len(tokenizer.encode(TEXTS[0], add_special_tokens=False))
    assert joined[n0].item() == tokenizer.eos_token_id  # texts are joined with eos
    pairs = token_stream([("Where is Mary ?", "kitchen")], tokenizer)
    assert pairs.tolist() == tokenizer.encode("Where is Mary ? kitchen", add_special_tokens=False)
    ids = torch.arange(12).view(3, 4)
    assert token_stream(ids).tolist() == list(range(12))
    with pytest.raises(DiffMambaError, match="not a file"):
        token_stream(str(tmp_path / "missing.txt"), tokenizer)
    with pytest.raises(DiffMambaError, match="tokenizer"):
        token_stream(TEXTS, None)


def test_tuned_lens_save_load_roundtrip_and_mismatch(make_model, tmp_path):
    model = make_model("mamba2", n_layers=2, seed=6)
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(6))
    lens = train_tuned_lens(model, ids, steps=5, lr=1e-2, batch=2, seq_len=8, optimizer="adam", progress=False)
    lens.save(tmp_path)
    meta = json.loads((tmp_path / "tuned_lens.json").read_text())
    assert (meta["n_layers"], meta["d_model"]) == (2, 32) and meta["train"]["steps"] == 5
    back = TunedLens.load(tmp_path, model)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in lens.state_dict().items())
    assert back.train_config == lens.train_config
    x = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(back.log_probs(model, x), lens.log_probs(model, x), atol=0, rtol=0)
    assert not torch.allclose(lens.log_probs(model, x)[0], logit_lens(model, x)[0])  # it was trained
    with pytest.raises(DiffMambaError, match="n_layers=2"):
        TunedLens.load(tmp_path, make_model("mamba2", n_layers=3))
    with pytest.raises(DiffMambaError, match="d_model=32"):
        TunedLens.load(tmp_path, make_model("mamba2", n_layers=2, d_model=48))
    with pytest.raises(DiffMambaError, match="no tuned lens"):
        TunedLens.load(tmp_path / "nowhere", model)
    with pytest.raises(DiffMambaError, match="n_layers"):
        lens.log_probs(make_model("mamba2", n_layers=3), x)


# -- branch lens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["diffmamba1", "diffmamba2"])
def test_branch_parts_add_up_to_the_block(make_model, arch):
    model = make_model(arch, n_layers=2, diff_layers="all")
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(9))
    df = branch_lens(model, ids, [3, 11], position=2, progress=False)
    wide = df.pivot_table(index=["example", "layer"], columns="component", values="value")
    assert len(wide) == 4
    torch.testing.assert_close(torch.tensor((wide["mixer_1"] + wide["-λ·mixer_2"]).values),
                               torch.tensor(wide["block"].values), atol=1e-10, rtol=0)
    assert (wide["-λ·mixer_2"].abs() > 0).all()

    # the vector decomposition itself adds up to hook_mixer_out
    _, cache = model.run_with_cache(ids)
    blk = model.blocks[1]
    lam, s = cache["blocks.1.hook_lambda"], cache["blocks.1.subln.hook_scale"]
    g = (1 - blk.lambda_init) * blk.subln.weight
    part1 = g * (cache["blocks.1.mixer_1.hook_out"] * s)
    part2 = g * (-lam * cache["blocks.1.mixer_2.hook_out"] * s)
    torch.testing.assert_close(part1 + part2, cache["blocks.1.hook_mixer_out"], atol=1e-10, rtol=0)


def test_branch_lens_prompts_of_different_lengths_match_one_by_one(make_model, tokenizer):
    model = make_model("diffmamba2", n_layers=2, vocab=len(tokenizer), seed=10)
    model.tokenizer = tokenizer
    prompts = [TEXTS[0], "Where is Mary ?", TEXTS[1], "Where is John ?"]
    together = branch_lens(model, prompts, ["kitchen", "garden", "office", "hallway"], batch_size=4, progress=False)
    for ex, (p, t) in enumerate(zip(prompts, ["kitchen", "garden", "office", "hallway"])):
        ids = torch.tensor([tokenizer.encode(p, add_special_tokens=False)])
        one = branch_lens(model, ids, [tokenizer.encode(" " + t, add_special_tokens=False)[0]], progress=False)
        mine = together[together.example == ex].reset_index(drop=True)
        assert list(mine.component) == list(one.component)
        torch.testing.assert_close(torch.tensor(mine.value.values), torch.tensor(one.value.values), atol=1e-12, rtol=0)
    with pytest.raises(DiffMambaError, match="targets"):
        branch_lens(model, prompts, ["kitchen"], progress=False)


def test_lens_is_a_module_that_follows_its_model(make_model, tmp_path):
    model = make_model("mamba2", n_layers=2, dtype=torch.float32)
    lens = TunedLens(model)
    assert isinstance(lens, torch.nn.Module) and lens.model is model
    assert set(lens.state_dict()) == {f"translators.{k}.{p}" for k in range(2) for p in ("weight", "bias")}
    assert sum(p.numel() for p in lens.parameters()) == 2 * (32 * 32 + 32)  # its own parameters, not the model's
    model.tuned_lens = lens  # attached: follows model.to(...), never saved with the weights
    assert not any(k.startswith("tuned_lens") for k in model.state_dict())
    assert "tuned_lens" not in dict(model.named_modules())
    model.to(torch.float64)
    assert lens.translators[0].weight.dtype == torch.float64
    from diffmamba_interp.analysis.lens import resolve_lens

    assert resolve_lens(model, "tuned") is lens
    model.save_pretrained(tmp_path)
    from diffmamba_interp import load_model

    assert load_model(tmp_path).state_dict().keys() == model.state_dict().keys()
    del model.tuned_lens
