"""The forms of the whole-block map (include_D, include_bias, the papers' drawn form and their
min-max normalisation) and windows of target rows (the answer row at long context)."""

import pytest
import torch

from diffmamba_interp.analysis.attention import (
    ImplicitAttention, differential_summary, implicit_attention, minmax_abs, paper_form, row_window,
)
from diffmamba_interp.errors import DiffMambaError
from helpers import assert_identity

V = 32


@pytest.fixture(scope="module")
def make(tiny_model):
    def build(arch, n_groups=1, dtype=torch.float64, **kw):
        return tiny_model(arch, dtype=dtype, shared=True, vocab_size=V, d_state=4, head_dim=8, n_groups=n_groups,
                          chunk_size=256, d_conv=4, **kw)

    return build


def ids_(b=2, L=9, seed=1):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


def parts(model, ids, layer, branch):
    """From the hooks alone: rows (the block map's row scaling), y (the scan output incl. D·u), u, D,
    σ(v)·b (the conv bias through the activation) per channel [b, L, E], and α per channel [b, E, L, L]."""
    _, cache = model.run_with_cache(ids)
    block = model.blocks[layer]
    mixer = block.branch(branch) if hasattr(block, "mixer_1") else block.mixer
    p = f"blocks.{layer}." + (f"mixer_{branch}" if hasattr(block, "mixer_1") else "mixer")
    core, cp = (mixer.branch(branch), f"{p}.ssm_{branch}") if hasattr(mixer, "ssm_1") else (mixer, p)
    if hasattr(mixer, "in_proj1"):  # Diff-S6, Mamba-2 form: branch k's whole path is hooked under ssm_k
        p = cp
    E = mixer.d_inner
    alpha = implicit_attention(model, ids, layer, branch, kind="s6")  # checked against loops in test_attention.py
    v = cache[f"{p}.hook_conv"][..., :E]
    b = mixer.conv1d.bias[:E]
    y = cache[f"{cp}.hook_ssm_out"].flatten(2)
    u = cache[f"{p}.hook_ssm_in"].flatten(2)
    if hasattr(mixer, "head_dim"):  # Mamba-2: per-head α and D shared by the head's channels
        P = mixer.head_dim
        alpha, D = alpha.repeat_interleave(P, dim=1), core.D.repeat_interleave(P)
        scale = cache[f"{p}.norm.hook_scale"]  # [b, L, G] (ungrouped, [b, L, 1], in Diff-S6's Mamba-2 form)
        rows = mixer.norm.weight * scale.repeat_interleave(E // scale.shape[-1], -1) * cache[f"{p}.hook_gate"]
        if hasattr(mixer, "in_proj1"):  # and the subln's row scaling, (1 − λ_init)·w·1/rms
            m = f"blocks.{layer}.mixer"
            rows = rows * (1 - mixer.lambda_init) * mixer.subln.weight * cache[f"{m}.subln.hook_scale"]
    else:
        D = core.D
        rows = cache[f"{p}.hook_gate"]  # (Diff-S6's Mamba-1 form: no subln)
    x = cache[f"{p}.hook_xBC"][..., :E] if hasattr(mixer, "head_dim") else cache[f"{p}.hook_x"]
    return dict(rows=rows, y=y, u=u, D=D, sb=torch.sigmoid(v) * b, alpha=alpha, x=x)


FORMS = [("mamba1", 1, 0, None), ("mamba2", 2, 0, None), ("diffs6", 1, 0, 2), ("diffmamba2", 1, 0, 1),
         ("diffs6mamba2", 2, 0, 2)]
FORM_IDS = [f"{a}-b{br}" for a, _, _, br in FORMS]


@pytest.mark.parametrize("arch,G,layer,branch", FORMS, ids=FORM_IDS)
def test_each_form_reconstructs_what_it_claims(make, arch, G, layer, branch):
    """full: rows⊙y; include_D=False: rows⊙(y − D·u); include_bias=False: rows⊙(y − (α + D)·(σ(v)⊙b));
    the papers' form (neither): rows⊙(y − D·u − α·(σ(v)⊙b)), the output minus the D and bias terms."""
    model, ids = make(arch, G), ids_()
    q = parts(model, ids, layer, branch)
    rows, y, u, D, sb, alpha = q["rows"], q["y"], q["u"], q["D"], q["sb"], q["alpha"]
    alpha_sb = torch.einsum("bets,bse->bte", alpha, sb)  # α·(σ(v)⊙b)
    want = {
        (None, True): rows * y,
        (False, True): rows * (y - D * u),
        (None, False): rows * (y - alpha_sb - D * sb),
        (False, False): rows * (y - D * u - alpha_sb),
    }
    full = implicit_attention(model, ids, layer, branch, kind="block")
    for (with_D, with_bias), target in want.items():
        form = implicit_attention(model, ids, layer, branch, kind="block", include_D=with_D, include_bias=with_bias)
        assert_identity(form.reconstruct(q["x"]), target)
        if not with_bias:
            assert (form.bias == 0).all()
        if with_D is None:
            torch.testing.assert_close(form.matrix, full.matrix, atol=0, rtol=0)
    assert (rows * D * u).abs().max() > 1e-3 and (rows * alpha_sb).abs().max() > 1e-3  # the removed terms matter
    paper = paper_form(model, ids, layer, branch)
    torch.testing.assert_close(paper.reconstruct(q["x"]), want[(False, False)], atol=1e-13, rtol=0)
    # kind "s6" with include_D: α + diag(D), so y = (α + D)·u exactly
    aD = implicit_attention(model, ids, layer, branch, kind="s6", include_D=True)
    if aD.shape[1] != u.shape[-1]:
        aD = aD.repeat_interleave(u.shape[-1] // aD.shape[1], dim=1)
    assert_identity(torch.einsum("bets,bse->bte", aD, u), y)


def test_minmax_abs_is_the_papers_normalisation():
    m = torch.tensor([[[0.0, 0.0], [-4.0, 2.0]], [[1.0, 3.0], [5.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]])
    got = minmax_abs(m)
    torch.testing.assert_close(got[0], torch.tensor([[0.0, 0.0], [1.0, 0.5]]))  # |·| / max when min |·| = 0
    torch.testing.assert_close(got[1], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))  # each map to [0, 1] on its own
    assert (got[2] == 0).all()  # a constant map has no range
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    y = minmax_abs(x)
    assert torch.allclose(y.amin((-2, -1)), torch.zeros(3, 4)) and torch.allclose(y.amax((-2, -1)), torch.ones(3, 4))


WINDOWED = [("mamba1", None), ("mamba2", None), ("diffmamba2", 2), ("diffs6", 1), ("diffs6mamba2", 2)]


@pytest.mark.parametrize("arch,branch", WINDOWED, ids=[a for a, _ in WINDOWED])
def test_row_windows_are_the_rows_of_the_full_map(make, arch, branch):
    model, ids = make(arch, 2 if arch == "mamba2" else 1), ids_(L=11)
    for kind in ("s6", "block"):
        for reduce in (None, "mean", "absmean"):
            full = implicit_attention(model, ids, 0, branch, kind=kind, reduce=reduce)
            fm = full if kind == "s6" else full.matrix
            for rows, (a, b) in [((2, 7), (2, 7)), (-1, (10, 11)), (slice(None, 3), (0, 3)), (5, (5, 6))]:
                w = implicit_attention(model, ids, 0, branch, kind=kind, reduce=reduce, rows=rows, chunk=3)
                wm = w if kind == "s6" else w.matrix
                assert wm.shape[-2:] == (b - a, 11)
                torch.testing.assert_close(wm, fm[..., a:b, :], atol=1e-14, rtol=1e-12)
                if kind == "block":
                    assert list(w.rows) == list(range(a, b)) and w.t0 == a
                    torch.testing.assert_close(w.bias, full.bias[..., a:b], atol=1e-14, rtol=1e-12)
    # a window reconstructs the output at its rows
    x = parts(model, ids, 0, branch)["x"]
    w = implicit_attention(model, ids, 0, branch, kind="block", rows=(4, 9))
    full = implicit_attention(model, ids, 0, branch, kind="block")
    torch.testing.assert_close(w.reconstruct(x), full.reconstruct(x)[:, 4:9], atol=1e-14, rtol=0)
    d = differential_summary(model, ids, 0, reduce="mean", rows=-1) if branch else None
    if d is not None:
        torch.testing.assert_close(d, differential_summary(model, ids, 0, reduce="mean")[:, -1:], atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_answer_row_far_from_the_start_keeps_short_spans_exact(tiny_model, dtype):
    """The window's decays for columns before it are reverse cumulative sums, never differences of
    long prefix sums: with Δ ≈ 40 and a long sequence every entry is finite and the row equals the
    full map's last row."""
    model = tiny_model("mamba2", dtype=dtype, vocab_size=V, d_state=4, head_dim=8, chunk_size=256, d_conv=4)
    with torch.no_grad():
        model.blocks[0].mixer.dt_bias[:2].fill_(40.0)
    ids = ids_(b=1, L=300)
    full = implicit_attention(model, ids, 0, kind="s6")
    row = implicit_attention(model, ids, 0, kind="s6", rows=-1)
    assert torch.isfinite(row).all()
    torch.testing.assert_close(row, full[..., -1:, :], atol=0, rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_answer_row_of_a_16k_prompt(tiny_model):
    """The answer row at 16,384 tokens: the whole-block and output-space rows reconstruct the last
    position's output (float64). The full maps would be [E, 16k, 16k], 68 GB per layer in float64:
    this only runs because a row costs O(L) per channel."""
    model = tiny_model("diffmamba2", dtype=torch.float64, vocab_size=V, d_state=4, head_dim=8, chunk_size=256,
                       d_conv=4, n_layers=1, diff_layers="all")
    L = 16384
    ids = ids_(b=1, L=L, seed=5)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_normalized", "hook_mixer_out", "hook_xBC")))
    h, want = cache["blocks.0.norm.hook_normalized"], cache["blocks.0.hook_mixer_out"]
    out = implicit_attention(model, ids, 0, kind="output", rows=-1)
    assert_identity(out.reconstruct(h), want[:, -1:])
    assert out.frobenius().shape == (1, 1, L)
    blk = implicit_attention(model, ids, 0, 1, kind="block", rows=-1)
    assert blk.matrix.shape == (1, 16, 1, L)
    x = cache["blocks.0.mixer_1.hook_xBC"][..., :16]
    assert_identity(blk.reconstruct(x), cache["blocks.0.mixer_1.norm.hook_normalized"][:, -1:])


def test_errors(make):
    m = make("mamba2")
    ids = ids_()
    for bad in (9, -10, (5, 5), (3, 20), "a", (1.0, 2), slice(0, 4, 2), True):
        with pytest.raises(DiffMambaError, match="row"):
            implicit_attention(m, ids, 0, rows=bad)
    assert row_window(None, 5) is None and row_window(-2, 5) == (3, 4) and row_window((None, -1), 5) == (0, 4)
    with pytest.raises(DiffMambaError, match="include_D"):
        implicit_attention(m, ids, 0, kind="block", include_D="yes")
    # a window's map says which rows it holds; a square map needs no t0
    ImplicitAttention(torch.zeros(1, 3, 2, 5), torch.zeros(1, 3, 2), t0=3)
    with pytest.raises(DiffMambaError, match="t0"):
        ImplicitAttention(torch.zeros(1, 3, 2, 5), torch.zeros(1, 3, 2), t0=4)
