"""Activation, state and attribution patching (analysis/patching.py) against hand-written loops,
TransformerLens's patching and recurrent.patch_state."""

import html

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching
from typer.testing import CliRunner

from helpers import hand_patch_loop

from diffmamba_interp import load_model, patch_state
from diffmamba_interp.cli import app
from diffmamba_interp.data import format_prompt
from diffmamba_interp.analysis.patching import answer_prob, logit_diff, patch
from diffmamba_interp.errors import DiffMambaError

CLEAN = "Mary went to the kitchen . John moved to the garden . Where is Mary ?"
CORRUPT = "Mary went to the garden . John moved to the kitchen . Where is Mary ?"
ARCHS = ["mamba1", "mamba2", "diffmamba1", "diffmamba2", "diffs6", "diffs6mamba2"]
L = 7


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (1, L), generator=g), torch.randint(0, 40, (1, L), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_patching_equals_the_hand_written_loop(tiny_model, arch):
    model = tiny_model(arch, diff_layers="all", n_layers=3, dtype=torch.float64, shared=True)
    clean, corrupt = _pair()
    metric = logit_diff(3, 4)
    whats = ["resid", "mixer", "blocks.{layer}.hook_resid_post"] + (["branch"] if arch != "mamba1" and arch != "mamba2" else [])
    for what in whats:
        res = patch(model, clean, corrupt, metric, what=what, batch_size=3, chunk_size=4, progress=False)
        for hook, df in res.frame.groupby("hook", sort=False):
            want = hand_patch_loop(model, clean, corrupt, hook, metric)
            np.testing.assert_allclose(df.sort_values("position")["value"].to_numpy(), want, rtol=0, atol=1e-10,
                                       err_msg=f"{what} {hook}")
        assert res.frame["value"].std() > 0
    # the baselines are the unpatched runs
    with torch.no_grad():
        assert res.clean_metric == pytest.approx(float(metric(model(clean)[:, -1])[0]), abs=1e-10)
        assert res.corrupt_metric == pytest.approx(float(metric(model(corrupt)[:, -1])[0]), abs=1e-10)


def test_resid_patching_equals_transformer_lens(tiny_model):
    model = tiny_model("diffmamba2", diff_layers="all", dtype=torch.float64, shared=True)
    clean, corrupt = _pair(1)
    _, cache = model.run_with_cache(clean)
    metric = logit_diff(5, 6)
    tl = tl_patching.get_act_patch_resid_pre(model, corrupt, cache, lambda logits: metric(logits[:, -1])[0])
    ours = patch(model, clean, corrupt, metric, what="resid", progress=False)
    np.testing.assert_allclose(ours.grid().to_numpy(), tl.numpy(), rtol=0, atol=1e-6)  # TL stores float32
    # normalized = (value − corrupted) / (clean − corrupted): 1 where the clean result is restored, as by
    # the final residual at the last position
    last = patch(model, clean, corrupt, metric, what="blocks.{layer}.hook_resid_post", layers=[1], positions=[-1],
                 progress=False)
    assert last.frame["normalized"].item() == pytest.approx(1.0, abs=1e-9)
    f = ours.frame
    np.testing.assert_allclose(f["normalized"], (f["value"] - ours.corrupt_metric) / (ours.clean_metric - ours.corrupt_metric))


def test_positions_layers_and_batching_do_not_change_values(tiny_model):
    model = tiny_model("mamba2", n_layers=3, dtype=torch.float64, shared=True)
    clean, corrupt = _pair(2)
    full = patch(model, clean, corrupt, answer_prob(3), what="mixer", batch_size=32, progress=False)
    part = patch(model, clean, corrupt, answer_prob(3), what="mixer", positions=[-1, 2, 4], layers=[1, 2], batch_size=1,
                 progress=False)
    assert sorted(part.frame["position"].unique()) == [2, 4, 6] and sorted(part.frame["layer"].unique()) == [1, 2]
    merged = part.frame.merge(full.frame, on=["hook", "position"])
    np.testing.assert_allclose(merged["value_x"], merged["value_y"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("conv", [False, True])
def test_state_patching_equals_patch_state_cell_by_cell(tiny_model, arch, conv):
    model = tiny_model(arch, diff_layers="all", dtype=torch.float64, shared=True)
    clean, corrupt = _pair(3)
    metric = logit_diff(1, 2)
    res = patch(model, clean, corrupt, metric, what="state", conv=conv, batch_size=2, progress=False)
    units = [k for k, _ in model.mixers()]
    assert sorted(res.frame["hook"].unique()) == sorted(units)
    for unit in units:
        for p in range(L):
            _, st = model(clean[:, : p + 1], return_type=None, return_state=True)
            got = patch_state(model, corrupt, unit, p, fn=lambda h: st[unit].ssm,
                              conv_fn=(lambda c: st[unit].conv) if conv else None)
            want = float(metric(got[:, -1])[0])
            value = res.frame.query("hook == @unit and position == @p")["value"].item()
            assert value == pytest.approx(want, abs=1e-10), (unit, p)
    assert res.frame["value"].std() > 0


def test_attribution_is_exact_on_a_linear_piece(tiny_model):
    """The logits are linear in norm_f's output: attribution patching equals exact patching there."""
    model = tiny_model("diffmamba2", dtype=torch.float64, shared=True)
    clean, corrupt = _pair(4)
    metric = logit_diff(3, 4)
    exact = patch(model, clean, corrupt, metric, what="norm_f.hook_normalized", progress=False)
    attr = patch(model, clean, corrupt, metric, what="norm_f.hook_normalized", method="attribution", progress=False)
    np.testing.assert_allclose(attr.frame["value"], exact.frame["value"], rtol=0, atol=1e-10)
    assert abs(exact.frame["value"].iloc[-1] - exact.corrupt_metric) > 1e-3  # the last position moves the metric
    # not linear elsewhere: resid attribution differs from exact patching (an approximation)
    e = patch(model, clean, corrupt, metric, what="resid", progress=False).frame["value"]
    a = patch(model, clean, corrupt, metric, what="resid", method="attribution", progress=False).frame["value"]
    assert (e - a).abs().max() > 1e-6
    # the embedding is block 0's input: the same estimate through either hook
    emb = patch(model, clean, corrupt, metric, what="hook_embed", method="attribution", progress=False).frame["value"]
    np.testing.assert_allclose(emb, a[:L], rtol=0, atol=1e-10)
    # the weights' gradients are left alone and they still require grad
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_attribution_is_close_to_exact_on_the_shipped_model():
    model = load_model("models/mamba2-babi")  # the default shipped model (qa1 0.975 on the test split)
    clean = format_prompt(["Mary went to the kitchen.", "John moved to the garden."], "Where is Mary?")
    corrupt = format_prompt(["Mary went to the garden.", "John moved to the kitchen."], "Where is Mary?")
    for what in ("resid", "mixer"):
        e = patch(model, clean, corrupt, answer="kitchen", wrong="garden", what=what, progress=False)
        a = patch(model, clean, corrupt, answer="kitchen", wrong="garden", what=what, method="attribution",
                  progress=False)
        assert e.clean_metric != pytest.approx(e.corrupt_metric, abs=0.5)  # the swap moves the metric
        # a first-order estimate of a nonlinear model: 0.87 (resid) and 0.85 (mixer) on this model (logit
        # difference clean 7.98, corrupt -8.31). Other shipped models: Mamba-2 seed 1 0.76 / 0.81,
        # seed 2 0.74 / 0.61, Diff-Mamba-2 seed 0 0.79 / 0.80, Diff-Mamba-2 seed 2 (qa1 0.72) 0.34 / 0.79
        assert np.corrcoef(e.frame["value"], a.frame["value"])[0, 1] > 0.6, what


def test_bad_patching_input_is_refused(tiny_model):
    model = tiny_model("mamba2", shared=True)
    clean, corrupt = _pair(5)
    m = logit_diff(1, 2)
    cases = [
        (dict(corrupt=corrupt[:, :5]), "same token length"),
        (dict(what="state", method="attribution"), "attribution patching of states"),
        (dict(what="branch"), "needs differential layers"),
        (dict(what="blocks.{layer}.mixer.hook_ssm_state"), "what='state'"),
        (dict(what="nonsense"), "unknown what"),
        (dict(method="greedy"), "unknown method"),
        (dict(layers=[9]), "out of range"),
        (dict(positions=[40]), "out of range"),
        (dict(batch_size=0), "batch_size"),
    ]
    for kw, msg in cases:
        args = dict(clean=clean, corrupt=corrupt, metric=m, progress=False) | kw
        with pytest.raises(DiffMambaError, match=msg):
            patch(model, **args)
    with pytest.raises(DiffMambaError, match="give a metric"):
        patch(model, clean, corrupt, progress=False)
    diff = tiny_model("diffmamba2", shared=True)
    with pytest.raises(DiffMambaError, match="parameter"):
        patch(diff, clean, corrupt, m, what="blocks.{layer}.hook_lambda", layers=[0], progress=False)


def test_the_figure_draws_every_cell(tiny_model):
    model = tiny_model("diffmamba2", shared=True)
    clean, corrupt = _pair(6)
    res = patch(model, clean, corrupt, logit_diff(1, 2), what="branch", progress=False)
    fig = res.figure()
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (2, L) and np.isfinite(z).all()
    assert list(fig.data[0].y) == ["block 0 · mixer_1", "block 0 · mixer_2"]
    assert fig.layout.coloraxis is not None and fig.data[0].zmin == -fig.data[0].zmax


def test_patch_cli_writes_the_report_and_the_csv(tmp_path):
    out, csv = tmp_path / "p.html", tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "kitchen", "--wrong", "garden",
                            "--what", "branch", "--positions", "-4:", "--out", str(out), "--csv", str(csv), "-q"])
    assert res.exit_code == 0, res.output
    assert "mamba2-babi has no differential layers" in res.output and "the 10 largest effects" in res.output
    df = pd.read_csv(csv)
    n = len(load_model("models/diffmamba2-babi").to_tokens(CLEAN)[0])
    assert set(df["model"]) == {"diffmamba2-babi"} and sorted(df["position"].unique()) == list(range(n - 4, n))
    assert set(df["component"]) == {"mixer_1", "mixer_2"}
    page = out.read_text()
    assert page.count('class="plotly-graph-div"') == 1 and "Activation patching: branch" in page
    # bad input: one line, exit 2, nothing written
    bad = CliRunner().invoke(app, ["patch", "--clean", CLEAN, "--corrupt", "Mary went .", "--answer", "kitchen",
                            "--out", str(tmp_path / "bad.html")])
    assert bad.exit_code == 2 and "same token length" in bad.output and not (tmp_path / "bad.html").exists()
    # (an answer outside a word-level vocabulary: tests/test_tokenizer_guard.py; the shipped byte-level BPE has none)


def test_the_report_patches_its_example_into_the_swap_corruption(tmp_path):
    from diffmamba_interp.data import load_data
    from diffmamba_interp.jobs import full_report, swap_corruption

    prompt = load_data("babi:qa1", n=4)[0]
    corrupt, a, b = swap_corruption(prompt)
    assert a == prompt.answer and b in prompt.candidates and b != a
    assert corrupt.count(b) == prompt.prompt.count(a) and corrupt.count(a) == prompt.prompt.count(b)
    _, path = full_report(n=4, out=tmp_path / "r.html", progress=False)
    page = path.read_text()
    assert '>Patching</h2>' in page and page.count('id="fig-patching-') == 2  # one heat-map per model
    assert html.escape(f"{a!r} and {b!r} swapped in the story") in page
