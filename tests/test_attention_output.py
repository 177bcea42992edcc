"""kind="output": the exact operator of a whole block in its d-dimensional output space.

Checked in float64 against what the block computes (hook_mixer_out from its normed input), against
the formula O[t,s] = ρ_t·Σ_k c_k·W_out,k·diag(𝒜_k[:, t, s])·W_in,k written out from the "block"
kind (itself checked against explicit loops in test_attention.py), and its reductions against the
dense operator."""

import pytest
import torch

from diffmamba_interp.analysis.attention import OutputAttention, differential_summary, implicit_attention
from diffmamba_interp.errors import DiffMambaError
from helpers import assert_identity

V = 32


@pytest.fixture(scope="module")
def make(tiny_model):
    """make(arch, bias=False, n_groups=1, dtype=float64, fresh=False): a tiny perturbed model (layer 0
    differential, layer 1 plain for the differential archs)."""

    def build(arch, bias=False, n_groups=1, dtype=torch.float64, fresh=False):
        return tiny_model(arch, dtype=dtype, shared=not fresh, vocab_size=V, d_state=4, head_dim=8, n_groups=n_groups,
                          chunk_size=256, d_conv=4, bias=bias)

    return build


def ids_(b=2, L=9, seed=1):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


# (arch, layer, n_groups): every architecture's differential layer and a plain layer
LAYERS = [("mamba1", 0, 1), ("mamba2", 1, 2), ("diffmamba1", 0, 1), ("diffmamba1", 1, 1), ("diffmamba2", 0, 2),
          ("diffmamba2", 1, 1), ("diffs6", 0, 1), ("diffs6", 1, 1), ("diffs6mamba2", 0, 2),
          ("diffs6mamba2", 1, 1)]
LAYER_IDS = [f"{a}-L{lay}-g{g}" for a, lay, g in LAYERS]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("arch,layer,G", LAYERS, ids=LAYER_IDS)
def test_reconstructs_the_block_output(make, arch, layer, G, bias):
    """reconstruct(normed input) == hook_mixer_out, with conv, in_proj and out_proj biases (bias=True)."""
    model, ids = make(arch, bias, G), ids_()
    _, cache = model.run_with_cache(ids)
    op = implicit_attention(model, ids, layer, kind="output")
    assert isinstance(op, OutputAttention)
    h, want = cache[f"blocks.{layer}.norm.hook_normalized"], cache[f"blocks.{layer}.hook_mixer_out"]
    assert_identity(op.reconstruct(h), want)
    # the bias terms are the output for h = 0 with every map frozen, and the operator part is the rest
    assert_identity(op.apply(h) + op.bias(), want)
    torch.testing.assert_close(op.bias(), op.reconstruct(torch.zeros_like(h)), atol=1e-14, rtol=0)
    assert op.bias().abs().max() > 1e-4  # the conv bias is there in every model (conv_bias=True)
    # without bias terms: the operator part alone
    nob = implicit_attention(model, ids, layer, kind="output", include_bias=False)
    torch.testing.assert_close(nob.reconstruct(h), op.apply(h), atol=1e-14, rtol=0)


def _formula(model, ids, cache, layer):
    """O [b, L, L, d, d] and the branch terms, written out from the per-branch "block" maps."""
    block = model.blocks[layer]
    if hasattr(block, "subln"):  # a differential block: each mixer its own projections
        lam, scale = cache[f"blocks.{layer}.hook_lambda"], cache[f"blocks.{layer}.subln.hook_scale"][..., 0]
        gain = (1 - block.lambda_init) * block.subln.weight
        terms = []
        for k, coef in ((1, 1.0), (2, -lam)):
            mixer = block.branch(k)
            a = implicit_attention(model, ids, layer, branch=k, kind="block").matrix  # [b, E, L, L]
            E = mixer.d_inner
            w_in = mixer.in_proj.weight[E : 2 * E] if hasattr(mixer, "head_dim") else mixer.in_proj.weight[:E]
            term = torch.einsum("de,bets,ef->btsdf", mixer.out_proj.weight, a, w_in)  # W_out,k·diag(𝒜_k)·W_in,k
            terms.append(coef * scale[:, :, None, None, None] * gain.view(1, 1, 1, -1, 1) * term)
        return terms
    mixer = block.mixer
    E = mixer.d_inner
    if hasattr(mixer, "in_proj1"):  # Diff-S6, Mamba-2 form: W_out·(diag(𝒜₁)·W_in,1 − λ·diag(𝒜₂)·W_in,2)
        lam = cache[f"blocks.{layer}.mixer.hook_lambda"]
        return [coef * torch.einsum("de,bets,ef->btsdf", mixer.out_proj.weight,
                                    implicit_attention(model, ids, layer, branch=k, kind="block").matrix,
                                    getattr(mixer, f"in_proj{k}").weight[E : 2 * E])
                for k, coef in ((1, 1.0), (2, -lam))]
    w_in = mixer.in_proj.weight[E : 2 * E] if hasattr(mixer, "head_dim") else mixer.in_proj.weight[:E]
    if hasattr(mixer, "ssm_1"):  # Diff-S6, Mamba-1 form: shared projections, W_out·diag(𝒜₁ − λ𝒜₂)·W_in
        lam = cache[f"blocks.{layer}.mixer.hook_lambda"]
        return [coef * torch.einsum("de,bets,ef->btsdf", mixer.out_proj.weight,
                                    implicit_attention(model, ids, layer, branch=k, kind="block").matrix, w_in)
                for k, coef in ((1, 1.0), (2, -lam))]
    a = implicit_attention(model, ids, layer, kind="block").matrix
    return [torch.einsum("de,bets,ef->btsdf", mixer.out_proj.weight, a, w_in)]


@pytest.mark.parametrize("arch,layer,G", LAYERS, ids=LAYER_IDS)
def test_dense_operator_is_the_formula_and_branches_add_up(make, arch, layer, G):
    """dense() == ρ_t·(1 − λ_init)·diag(w_subln)·(W_out,1·𝒜₁·W_in,1 − λ·W_out,2·𝒜₂·W_in,2) for a
    differential block (W_out·diag(𝒜₁ − λ𝒜₂)·W_in for Diff-S6's Mamba-1 form, W_out·(𝒜₁·W_in,1 −
    λ·𝒜₂·W_in,2) for its Mamba-2 form, W_out·diag(𝒜)·W_in for a plain
    block); branch(k) is term k; the terms and the shared bias add up to the whole."""
    model, ids = make(arch, True, G), ids_(L=7)
    _, cache = model.run_with_cache(ids)
    op = implicit_attention(model, ids, layer, kind="output")
    terms = _formula(model, ids, cache, layer)
    dense = op.dense()
    assert dense.shape == (2, 7, 7, 16, 16)
    assert_identity(dense, sum(terms).detach())
    assert (dense.flatten(-2)[:, torch.triu_indices(7, 7, 1)[0], torch.triu_indices(7, 7, 1)[1]] == 0).all()  # causal
    h, want = cache[f"blocks.{layer}.norm.hook_normalized"], cache[f"blocks.{layer}.hook_mixer_out"]
    assert len(op.branches) == len(terms)
    if len(terms) == 2:
        for k in (1, 2):
            assert_identity(op.branch(k).dense(), terms[k - 1].detach())
            alone = implicit_attention(model, ids, layer, branch=k, kind="output")
            torch.testing.assert_close(alone.dense(), op.branch(k).dense(), atol=1e-14, rtol=0)
        shared = 0 if op.shared_bias is None else op.shared_bias
        assert_identity(op.branch(1).reconstruct(h) + op.branch(2).reconstruct(h) + shared, want)
        # one branch alone is not the output: the other one matters
        assert (op.branch(1).reconstruct(h) - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch,layer,G", [LAYERS[i] for i in (1, 2, 4, 6, 8)], ids=[LAYER_IDS[i] for i in (1, 2, 4, 6, 8)])
def test_frobenius_and_projection_match_the_dense_operator(make, arch, layer, G):
    model, ids = make(arch, True, G), ids_(L=7)
    _, cache = model.run_with_cache(ids)
    op = implicit_attention(model, ids, layer, kind="output")
    dense = op.dense()
    h, want = cache[f"blocks.{layer}.norm.hook_normalized"], cache[f"blocks.{layer}.hook_mixer_out"]
    torch.testing.assert_close(op.frobenius(), dense.flatten(-2).norm(dim=-1), atol=1e-13, rtol=1e-10)
    u = torch.randn(2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    contrib = op.project(u, h)  # [b, T, L]
    torch.testing.assert_close(contrib, torch.einsum("bd,btsdf,bsf->bts", u, dense, h), atol=1e-13, rtol=1e-10)
    # Σ_s of the contributions plus the bias's share is the output along u, exactly
    assert_identity(contrib.sum(-1) + op.project_bias(u), torch.einsum("btd,bd->bt", want, u))
    # one pass gives the per-branch norms and contributions of each term
    s = op.summaries(h=h, direction=u)
    for k, (nk, ck) in enumerate(zip(s.norm_branches, s.contrib_branches), start=1):
        part = op.branch(k) if len(op.branches) > 1 else op
        torch.testing.assert_close(nk, part.frobenius(), atol=1e-13, rtol=1e-10)
        torch.testing.assert_close(ck, part.project(u, h), atol=1e-13, rtol=1e-10)
    torch.testing.assert_close(s.contrib, sum(s.contrib_branches), atol=1e-14, rtol=0)
    torch.testing.assert_close(s.contrib_bias, op.project_bias(u), atol=1e-14, rtol=0)


@pytest.mark.parametrize("arch,layer", [("diffmamba2", 0), ("mamba1", 1), ("diffs6", 0), ("diffs6mamba2", 0)])
def test_rows_and_chunks_change_nothing(make, arch, layer):
    """A window of target rows, the answer row (rows=-1) and any rows-per-step give the same numbers."""
    model, ids = make(arch, True), ids_(L=10)
    _, cache = model.run_with_cache(ids)
    h = cache[f"blocks.{layer}.norm.hook_normalized"]
    full = implicit_attention(model, ids, layer, kind="output")
    F, out = full.frobenius(), full.reconstruct(h)
    for rows, (a, b) in [((3, 8), (3, 8)), (-1, (9, 10)), (slice(4, None), (4, 10)), (0, (0, 1))]:
        for chunk in (None, 1, 2):
            w = implicit_attention(model, ids, layer, kind="output", rows=rows, chunk=chunk)
            assert list(w.rows) == list(range(a, b))
            torch.testing.assert_close(w.frobenius(), F[:, a:b], atol=1e-14, rtol=1e-12)
            torch.testing.assert_close(w.reconstruct(h), out[:, a:b], atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(full.with_rows(2, 5).dense(), full.dense()[:, 2:5], atol=1e-14, rtol=0)


def test_frobenius_is_accurate_where_the_branches_cancel(make):
    """Branch 2 a copy of branch 1 and λ = 0.999: O = 0.001·(branch term). The norm, a sum of squares
    of Z·a, keeps float32 within 1e-3 of float64; a quadratic form aᵀKa in float32 would not (its
    rounding is ~eps·‖term‖², 10⁶·eps of the result's square, ~3e-2 relative in the norm)."""
    model = make("diffmamba2", fresh=True, dtype=torch.float64)
    block = model.blocks[0]
    with torch.no_grad():
        block.mixer_2.load_state_dict(block.mixer_1.state_dict())
        target = 0.999 - block.lambda_init  # sigmoid(Σ q1) = λ − λ_init
        block.lambda_q1.fill_(float(torch.logit(torch.tensor(target, dtype=torch.float64))) / block.lambda_q1.numel())
    ids = ids_(L=8)
    assert abs(float(block.lam().detach()) - 0.999) < 1e-12
    ref = implicit_attention(model, ids, 0, kind="output").frobenius()
    one = implicit_attention(model, ids, 0, kind="output", branch=1).frobenius()
    torch.testing.assert_close(ref, 0.001 * one, rtol=1e-6, atol=0)  # the branches really cancel to 1/1000
    got = implicit_attention(model.float(), ids, 0, kind="output").frobenius()
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    rel = ((got.double() - ref).abs() / ref.clamp(min=1e-30))[:, causal]
    assert rel.max() < 1e-3, rel.max()


def test_errors(make):
    d2, m1 = make("diffmamba2"), make("mamba1")
    ids = ids_()
    with pytest.raises(DiffMambaError, match="reduce=None"):
        implicit_attention(d2, ids, 0, kind="output", reduce="mean")
    with pytest.raises(DiffMambaError, match="kind='output'"):
        differential_summary(d2, ids, 0, kind="output")
    with pytest.raises(DiffMambaError, match="branch=1 or branch=2"):
        implicit_attention(d2, ids, 0, branch=3, kind="output")
    with pytest.raises(DiffMambaError, match="plain"):
        implicit_attention(m1, ids, 0, branch=1, kind="output")
    op = implicit_attention(m1, ids, 0, kind="output")
    with pytest.raises(DiffMambaError, match=r"\[batch, pos, d\]"):
        op.reconstruct(torch.zeros(2, 9, 15))
    with pytest.raises(DiffMambaError, match="branch 2 out of range"):
        op.branch(2)
    with pytest.raises(DiffMambaError, match="needs h"):
        op.summaries(direction=torch.ones(16))
    with pytest.raises(DiffMambaError, match="direction"):
        op.project(torch.ones(3, 16), torch.zeros(2, 9, 16, dtype=torch.float64))
    big = implicit_attention(m1, ids_(b=1, L=600), 0, kind="output")
    with pytest.raises(DiffMambaError, match="frobenius"):
        big.dense()  # 600·600·16·16 elements > the dense limit (2^26)
