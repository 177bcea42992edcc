"""Implicit attention (docs/conventions.md, "Implicit attention"): the scan identities, the whole-block reconstructions, a naive
O(L³) loop, reduce/chunk equivalences, numerics at extreme Δ·|A|, the differential map, errors."""


import pytest
import torch

from diffmamba_interp import HookedMamba, MambaConfig  # noqa: F401
from diffmamba_interp.analysis.attention import ImplicitAttention, differential_attention, implicit_attention
from diffmamba_interp.errors import DiffMambaError

V = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add OpenMP overhead, which on a loaded 2-core
    machine turns a 2-channel-group conv1d into ~100 ms. Restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def make(tiny_model):
    """make(arch, n_groups=1, dtype=float64, seed=0, diff_layers="alternate", fresh=False): a tiny perturbed
    model, shared between tests unless `fresh` (for a test that edits weights)."""

    def build(arch, n_groups=1, dtype=torch.float64, seed=0, diff_layers="alternate", fresh=False):
        return tiny_model(arch, seed=seed, dtype=dtype, shared=not fresh, vocab_size=V, d_state=4, head_dim=8,
                          n_groups=n_groups, diff_layers=diff_layers, chunk_size=256, d_conv=4)

    return build


def ids_(b=2, L=9, seed=1):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


# (arch, n_groups, layer, branch, hook prefix of the front, hook prefix of the scan core)
TARGETS = [
    ("mamba1", 1, 1, None, "blocks.1.mixer", "blocks.1.mixer"),
    ("mamba2", 1, 0, None, "blocks.0.mixer", "blocks.0.mixer"),
    ("mamba2", 2, 1, None, "blocks.1.mixer", "blocks.1.mixer"),
    ("diffmamba1", 1, 0, 1, "blocks.0.mixer_1", "blocks.0.mixer_1"),
    ("diffmamba1", 1, 0, 2, "blocks.0.mixer_2", "blocks.0.mixer_2"),
    ("diffmamba2", 2, 0, 1, "blocks.0.mixer_1", "blocks.0.mixer_1"),
    ("diffmamba2", 2, 0, 2, "blocks.0.mixer_2", "blocks.0.mixer_2"),
    ("diffs6", 1, 0, 1, "blocks.0.mixer", "blocks.0.mixer.ssm_1"),
    ("diffs6", 1, 0, 2, "blocks.0.mixer", "blocks.0.mixer.ssm_2"),
    ("diffs6", 1, 1, None, "blocks.1.mixer", "blocks.1.mixer"),  # diffs6's plain (odd) layer
    ("diffs6mamba2", 2, 0, 1, "blocks.0.mixer.ssm_1", "blocks.0.mixer.ssm_1"),  # each branch its own in_proj
    ("diffs6mamba2", 2, 0, 2, "blocks.0.mixer.ssm_2", "blocks.0.mixer.ssm_2"),
    ("diffs6mamba2", 1, 1, None, "blocks.1.mixer", "blocks.1.mixer"),  # its plain (odd) layer: Mamba-2
]
DIFFS6 = ("diffs6", "diffs6mamba2")  # a differential mixer in a plain block: tested with diff_layers "alternate"
TARGET_IDS = [f"{a}-g{g}-L{lay}-b{br}" for a, g, lay, br, *_ in TARGETS]


def assert_identity(got, want, atol=1e-6):
    """|got − want| ≤ atol everywhere, and ≤ 1e-9 of the scale of `want` (float64: ~1e-16 is reached),
    with `want` far from 0 so that the identity is not trivially 0 = 0."""
    scale = want.abs().max().item()
    err = (got.detach() - want.detach()).abs().max().item()
    assert scale > 1e-5, f"degenerate identity: scale {scale:.3g}"
    assert err <= atol and err <= 1e-9 * scale, f"max abs err {err:.3g} (scale {scale:.3g})"


def scan_identity(model, cache, front, core, alpha):
    """(lhs, rhs) of y − D·u = Σ_s α[t,s]·u_s (per channel for S6, per head for SSD)."""
    D = model.get_submodule(core).D
    u, y = cache[f"{front}.hook_ssm_in"], cache[f"{core}.hook_ssm_out"]
    if u.ndim == 3:  # S6: [b, L, E]
        return y - D * u, torch.einsum("bcts,bsc->btc", alpha, u)
    return y - D.view(-1, 1) * u, torch.einsum("bhts,bshp->bthp", alpha, u)  # SSD: [b, L, H, P]


@pytest.mark.parametrize("arch,G,layer,branch,front,core", TARGETS, ids=TARGET_IDS)
def test_scan_identity(make, arch, G, layer, branch, front, core):
    model, ids = make(arch, G, diff_layers="all" if arch not in DIFFS6 else "alternate"), ids_()
    _, cache = model.run_with_cache(ids)
    alpha = implicit_attention(model, ids, layer, branch)
    mixer = model.get_submodule(front)
    n = mixer.n_heads if hasattr(mixer, "n_heads") else model.get_submodule(core).D.shape[0]
    assert alpha.shape == (2, n, 9, 9) and alpha.dtype == torch.float64
    lhs, rhs = scan_identity(model, cache, front, core, alpha)
    assert_identity(rhs, lhs)
    # causal: exactly 0 above the diagonal
    assert (alpha.triu(1) == 0).all()


@pytest.mark.parametrize("arch,G,layer,branch,front", [t[:5] for t in TARGETS if not (t[0] in DIFFS6 and t[3])],
                         ids=[i for i, t in zip(TARGET_IDS, TARGETS) if not (t[0] in DIFFS6 and t[3])])
def test_block_reconstruction(make, arch, G, layer, branch, front):
    """Mamba-1: reconstruct(hook_x) == hook_gated; Mamba-2: reconstruct(x of hook_xBC) == norm.hook_normalized."""
    model, ids = make(arch, G, diff_layers="all" if arch not in DIFFS6 else "alternate"), ids_()
    _, cache = model.run_with_cache(ids)
    res = implicit_attention(model, ids, layer, branch, kind="block")
    assert isinstance(res, ImplicitAttention)
    mixer = model.get_submodule(front)
    E = mixer.d_inner
    if f"{front}.hook_xBC" in cache:
        x, target = cache[f"{front}.hook_xBC"][..., :E], cache[f"{front}.norm.hook_normalized"]
    else:
        x, target = cache[f"{front}.hook_x"], cache[f"{front}.hook_gated"]
    assert res.matrix.shape == (2, E, 9, 9) and res.bias.shape == (2, E, 9)
    assert res.bias.abs().max() > 1e-3  # the conv bias term is really there (conv_bias=True)
    assert_identity(res.reconstruct(x), target)
    assert (res.matrix.triu(1) == 0).all()


def test_diffs6_block_difference_reconstructs_gated(make):
    """Diff-S6, Mamba-1 form: the cores share x and the gate, so (𝒜₁ − λ𝒜₂)x + (b₁ − λb₂) == hook_gated
    exactly (λ = hook_lambda = 1: upstream subtracts without a λ)."""
    model, ids = make("diffs6"), ids_()
    _, cache = model.run_with_cache(ids)
    diff = differential_attention(model, ids, 0, kind="block", reduce=None)
    assert_identity(diff.reconstruct(cache["blocks.0.mixer.hook_x"]), cache["blocks.0.mixer.hook_gated"])
    b1 = implicit_attention(model, ids, 0, 1, kind="block")
    b2 = implicit_attention(model, ids, 0, 2, kind="block")
    lam = cache["blocks.0.mixer.hook_lambda"]
    assert float(lam) == 1.0
    torch.testing.assert_close(diff.matrix, b1.matrix - lam * b2.matrix, atol=1e-12, rtol=0)
    # one branch alone does not reconstruct the output (the other branch matters)
    assert (b1.reconstruct(cache["blocks.0.mixer.hook_x"]) - cache["blocks.0.mixer.hook_gated"]).abs().max() > 1e-3


@pytest.mark.parametrize("G", [1, 2])
def test_diffs6mamba2_block_branches_reconstruct_out_proj_input(make, G):
    """Diff-S6, Mamba-2 form: branch k's block map (rows: its gated-norm scaling and the subln's, frozen)
    reconstructs its term from the x part of its own xBC, and term₁ − λ·term₂ is out_proj's input,
    (1 − λ_init)·subln.hook_normalized, exactly."""
    model, ids = make("diffs6mamba2", G), ids_()
    _, cache = model.run_with_cache(ids)
    mixer, p = model.blocks[0].mixer, "blocks.0.mixer"
    E = mixer.d_inner
    terms = []
    for k in (1, 2):
        res = implicit_attention(model, ids, 0, k, kind="block")
        assert res.matrix.shape == (2, E, 9, 9) and (res.matrix.triu(1) == 0).all()
        terms.append(res.reconstruct(cache[f"{p}.ssm_{k}.hook_xBC"][..., :E]))
    lam = cache[f"{p}.hook_lambda"]
    want = (1 - mixer.lambda_init) * cache[f"{p}.subln.hook_normalized"]
    assert_identity(terms[0] - lam * terms[1], want)
    assert_identity(mixer.out_proj(terms[0] - lam * terms[1]), cache[f"{p}.hook_out"])
    assert (terms[0] - want).abs().max() > 1e-3  # the other branch matters


# -- naive O(L³) references, written from the recurrence (products of per-step decays) -----------
def naive_s6(dt, A, B, C):
    """dt [b, L, E], A [E, N], B, C [b, L, N] -> [b, E, L, L] by explicit loops over t, s, k."""
    b, L, E = dt.shape
    out = torch.zeros(b, E, L, L, dtype=dt.dtype)
    for t in range(L):
        for s in range(t + 1):
            decay = torch.ones(b, E, A.shape[1], dtype=dt.dtype)
            for k in range(s + 1, t + 1):
                decay = decay * torch.exp(dt[:, k, :, None] * A)
            out[:, :, t, s] = (C[:, t, None, :] * decay * B[:, s, None, :]).sum(-1) * dt[:, s]
    return out


def naive_ssd(dt, A, B, C):
    """dt [b, L, H], A [H], B, C [b, L, G, N] -> [b, H, L, L] by explicit loops."""
    b, L, H = dt.shape
    G = B.shape[2]
    out = torch.zeros(b, H, L, L, dtype=dt.dtype)
    for h in range(H):
        g = h // (H // G)
        for t in range(L):
            for s in range(t + 1):
                decay = torch.ones(b, dtype=dt.dtype)
                for k in range(s + 1, t + 1):
                    decay = decay * torch.exp(dt[:, k, h] * A[h])
                out[:, h, t, s] = (C[:, t, g] * B[:, s, g]).sum(-1) * decay * dt[:, s, h]
    return out


def conv_matrix(w, L):
    """Taps [K] of a causal conv -> the L×L banded matrix M with (M x)_t = Σ_j w[j]·x[t − K + 1 + j]."""
    K = w.shape[0]
    M = torch.zeros(L, L, dtype=w.dtype)
    for t in range(L):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                M[t, s] = w[j]
    return M


@pytest.mark.parametrize("arch,G", [("mamba1", 1), ("mamba2", 2)])
def test_matches_naive_triple_loop(make, arch, G):
    model, ids = make(arch, G), ids_(b=2, L=6)
    _, cache = model.run_with_cache(ids)
    mix = model.blocks[0].mixer
    p = "blocks.0.mixer"
    A = -torch.exp(mix.A_log.detach().double())
    dt, B, C = cache[f"{p}.hook_dt"], cache[f"{p}.hook_B"], cache[f"{p}.hook_C"]
    ref = naive_s6(dt, A, B, C) if arch == "mamba1" else naive_ssd(dt, A, B, C)
    alpha = implicit_attention(model, ids, 0)
    torch.testing.assert_close(alpha, ref, atol=1e-12, rtol=1e-10)

    # whole block, per channel: diag(rows)·(α + D)·diag(σ(v))·M and its bias, as explicit matrices
    res = implicit_attention(model, ids, 0, kind="block")
    E, L = mix.d_inner, 6
    v = cache[f"{p}.hook_conv"][..., :E]
    if arch == "mamba1":
        rows = cache[f"{p}.hook_gate"]
        head = torch.arange(E)
        D = mix.D
    else:
        scale = cache[f"{p}.norm.hook_scale"].repeat_interleave(E // G, dim=-1)
        rows = mix.norm.weight * scale * cache[f"{p}.hook_gate"]
        head = torch.arange(E) // mix.head_dim
        D = mix.D[head]
        head = head
    for bi in range(2):
        for c in range(0, E, 5):
            a = ref[bi, head[c]] if arch == "mamba2" else ref[bi, c]
            core = (a + D[c] * torch.eye(L, dtype=a.dtype)) @ torch.diag(torch.sigmoid(v[bi, :, c]))
            want = torch.diag(rows[bi, :, c]) @ core @ conv_matrix(mix.conv1d.weight[c, 0], L)
            want_bias = rows[bi, :, c] * (core @ torch.full((L,), float(mix.conv1d.bias[c].detach()), dtype=a.dtype))
            torch.testing.assert_close(res.matrix[bi, c], want.detach(), atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(res.bias[bi, c], want_bias.detach(), atol=1e-12, rtol=1e-10)


# -- reduce and chunk ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,layer,branch", [("mamba1", 0, None), ("mamba2", 0, None), ("diffs6", 0, 2),
                                               ("diffs6mamba2", 0, 1)])
def test_reduce_and_chunk(make, arch, layer, branch):
    """reduce = mean / mean of |·| of the full tensor; chunking (sizes that do not divide the
    channel/head count, and for Mamba-2 "block" sizes below, equal to and above head_dim 8) changes nothing."""
    model, ids = make(arch, 1), ids_(b=2, L=7)
    full = implicit_attention(model, ids, layer, branch)
    n = full.shape[1]
    torch.testing.assert_close(implicit_attention(model, ids, layer, branch, chunk=3), full, atol=1e-14, rtol=0)
    for reduce, chunk, ref in [("mean", None, full.mean(1)), ("mean", 3, full.mean(1)),
                               ("absmean", 1, full.abs().mean(1)), ("absmean", n + 5, full.abs().mean(1))]:
        got = implicit_attention(model, ids, layer, branch, reduce=reduce, chunk=chunk)
        assert got.shape == (2, 7, 7)
        torch.testing.assert_close(got, ref, atol=1e-14, rtol=1e-12)
    blk = implicit_attention(model, ids, layer, branch, kind="block")
    part = implicit_attention(model, ids, layer, branch, kind="block", chunk=3)
    torch.testing.assert_close(part.matrix, blk.matrix, atol=1e-14, rtol=0)
    torch.testing.assert_close(part.bias, blk.bias, atol=1e-14, rtol=0)
    for reduce, chunk, fn in [("mean", 3, lambda t: t.mean(1)), ("absmean", 8, lambda t: t.abs().mean(1)),
                              ("mean", 20, lambda t: t.mean(1))]:
        red = implicit_attention(model, ids, layer, branch, kind="block", reduce=reduce, chunk=chunk)
        assert red.matrix.shape == (2, 7, 7) and red.bias.shape == (2, 7) and red.reduce == reduce
        torch.testing.assert_close(red.matrix, fn(blk.matrix), atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(red.bias, fn(blk.bias), atol=1e-14, rtol=1e-12)


def test_float32_model_computes_in_float32(make):
    model, ids = make("mamba2", 1, dtype=torch.float32), ids_()
    _, cache = model.run_with_cache(ids)
    alpha = implicit_attention(model, ids, 1)
    assert alpha.dtype == torch.float32
    lhs, rhs = scan_identity(model, cache, "blocks.1.mixer", "blocks.1.mixer", alpha)
    torch.testing.assert_close(rhs, lhs, atol=1e-4 * lhs.abs().max().item(), rtol=0)


# -- numerics at extreme decay -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_no_overflow_with_large_delta_times_A(make, arch, dtype):
    """Δ ≈ 40 and |A| up to e^5: a naive exp(A·(S_t − S_s)) overflows to inf above the diagonal
    (and inf·0 = nan); masking to −inf before the exponential keeps everything finite."""
    model, ids = make(arch, 1, dtype=dtype, fresh=True), ids_(L=40)
    mix = model.blocks[0].mixer
    with torch.no_grad():
        if arch == "mamba2":
            mix.dt_bias.fill_(40.0)
        else:
            mix.dt_proj.bias.fill_(40.0)
        mix.A_log.add_(3.0)
    _, cache = model.run_with_cache(ids)
    dt = cache["blocks.0.mixer.hook_dt"]
    A = torch.exp(mix.A_log.detach().float()).max()
    assert (dt.min() * A) > 80  # exp(Δ·|A|) would overflow even float32 (and exp(−x) underflows)
    for kind in ("s6", "block"):
        res = implicit_attention(model, ids, 0, kind=kind)
        m = res if kind == "s6" else res.matrix
        assert torch.isfinite(m).all() and (m.triu(1) == 0).all()
        assert (m.diagonal(dim1=-2, dim2=-1) != 0).any()  # the diagonal (no decay) survives
        for reduce in ("mean", "absmean"):
            r = implicit_attention(model, ids, 0, kind=kind, reduce=reduce, chunk=5)
            assert torch.isfinite(r if kind == "s6" else r.matrix).all()
    alpha = implicit_attention(model, ids, 0)
    lhs, rhs = scan_identity(model, cache, "blocks.0.mixer", "blocks.0.mixer", alpha)
    tol = 1e-6 if dtype == torch.float64 else 1e-4 * lhs.abs().max().item()
    torch.testing.assert_close(rhs.to(lhs.dtype), lhs, atol=tol, rtol=0)


# -- differential ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["diffmamba1", "diffmamba2", *DIFFS6])
@pytest.mark.parametrize("kind", ["s6", "block"])
@pytest.mark.parametrize("reduce", ["mean", "absmean"])
def test_differential_is_map1_minus_lambda_map2(make, arch, kind, reduce):
    model, ids = make(arch, 1), ids_(L=7)
    lam = model.blocks[0].lam() if arch not in DIFFS6 else model.run_with_cache(ids)[1]["blocks.0.mixer.hook_lambda"]
    got = differential_attention(model, ids, 0, kind=kind, reduce=reduce)
    m1 = implicit_attention(model, ids, 0, 1, kind=kind, reduce=reduce)
    m2 = implicit_attention(model, ids, 0, 2, kind=kind, reduce=reduce)
    if kind == "block":
        torch.testing.assert_close(got.bias, m1.bias - lam * m2.bias, atol=1e-13, rtol=0)
        got, m1, m2 = got.matrix, m1.matrix, m2.matrix
    assert got.shape == (2, 7, 7)
    want = m1 - lam.detach() * m2
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    assert (got - m1).abs().max() > 1e-6  # λ·map₂ really is subtracted


def test_differential_s6_per_channel_for_diffs6(make):
    model, ids = make("diffs6"), ids_(L=7)
    lam = model.run_with_cache(ids)[1]["blocks.0.mixer.hook_lambda"]
    got = differential_attention(model, ids, 0, reduce=None)
    want = implicit_attention(model, ids, 0, 1) - lam * implicit_attention(model, ids, 0, 2)
    assert got.shape == (2, 32, 7, 7)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)


# -- one block cached, nothing more -------------------------------------------------------------
def test_caches_only_the_block_hooks(make, monkeypatch):
    model, ids = make("diffmamba2", 1), ids_()
    seen = []
    orig = model.run_with_cache

    def spy(*args, names_filter=None, **kw):
        seen.append(list(names_filter))
        return orig(*args, names_filter=names_filter, **kw)

    monkeypatch.setattr(model, "run_with_cache", spy)
    implicit_attention(model, ids, 0, 2, kind="block")
    differential_attention(model, ids, 0)
    assert len(seen) == 2
    for names in seen:
        assert names and all(n.startswith("blocks.0.") for n in names)
        assert not any(n.endswith("hook_ssm_state") for n in names)
    assert all(".mixer_2." in n for n in seen[0])
    assert "blocks.0.hook_lambda" in seen[1]


# -- errors --------------------------------------------------------------------------------------
def test_errors(make):
    m2 = make("mamba2")
    d2 = make("diffmamba2")  # alternate: layer 0 differential, layer 1 plain
    s6 = make("diffs6")
    ids = ids_()
    with pytest.raises(DiffMambaError, match=r"0\.\.1"):
        implicit_attention(m2, ids, 2)
    with pytest.raises(DiffMambaError, match=r"out of range"):
        implicit_attention(m2, ids, -1)
    with pytest.raises(DiffMambaError, match="plain"):
        implicit_attention(m2, ids, 0, branch=1)
    with pytest.raises(DiffMambaError, match="plain"):
        implicit_attention(d2, ids, 1, branch=2)
    with pytest.raises(DiffMambaError, match="branch=1 or branch=2"):
        implicit_attention(d2, ids, 0)
    with pytest.raises(DiffMambaError, match="branch=1 or branch=2"):
        implicit_attention(d2, ids, 0, branch=3)
    with pytest.raises(DiffMambaError, match="Diff-S6"):
        implicit_attention(s6, ids, 0)
    with pytest.raises(DiffMambaError, match="kind"):
        implicit_attention(m2, ids, 0, kind="ssd")
    with pytest.raises(DiffMambaError, match="reduce"):
        implicit_attention(m2, ids, 0, reduce="sum")
    with pytest.raises(DiffMambaError, match="chunk"):
        implicit_attention(m2, ids, 0, reduce="mean", chunk=0)
    with pytest.raises(DiffMambaError, match="token id"):
        implicit_attention(m2, ids + V, 0)
    with pytest.raises(DiffMambaError, match="HookedMamba"):
        implicit_attention(torch.nn.Linear(2, 2), ids, 0)
    with pytest.raises(DiffMambaError, match="not a differential layer"):
        differential_attention(d2, ids, 1)
    with pytest.raises(DiffMambaError, match="not a differential layer"):
        differential_attention(m2, ids, 0)
    with pytest.raises(DiffMambaError, match="do not share"):
        differential_attention(d2, ids, 0, reduce=None)
    with pytest.raises(DiffMambaError, match="do not share"):  # Diff-S6's Mamba-2 form: in_proj1, in_proj2
        differential_attention(make("diffs6mamba2"), ids, 0, reduce=None)
    # the result dataclass validates shapes and refuses to reconstruct from a reduced map
    with pytest.raises(DiffMambaError, match="bias"):
        ImplicitAttention(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5))
    with pytest.raises(DiffMambaError, match="matrix"):
        ImplicitAttention(torch.zeros(1, 3, 4, 5), torch.zeros(1, 3, 4))
    with pytest.raises(DiffMambaError, match="matrix"):
        ImplicitAttention(torch.zeros(1, 4, 4), torch.zeros(1, 4))  # 3-D needs a reduce
    red = implicit_attention(m2, ids, 0, kind="block", reduce="mean")
    with pytest.raises(DiffMambaError, match="reduced"):
        red.reconstruct(torch.zeros(2, 9, 32))
    full = implicit_attention(m2, ids, 0, kind="block")
    with pytest.raises(DiffMambaError, match=r"\[batch, pos, E\]"):
        full.reconstruct(torch.zeros(2, 9, 31))
