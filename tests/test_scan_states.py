"""Recurrent mode of the scans (issue 11): initial and final states, one-token steps, the conv state,
and the SSD's precision under strong decay. Oracles: per-token float64 loops written here from
SPEC §1 (tests/reference.py's loops start from a zero state and work on whole mixers)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffmamba_interp.scan import (
    ScanOut,
    causal_conv1d,
    causal_conv1d_final_state,
    causal_conv1d_step,
    segdecay,
    selective_scan,
    selective_scan_torch,
    selective_state_step,
    ssd,
    ssd_state_step,
    ssd_torch,
)

cpu_scan = pytest.importorskip("diffmamba_interp.cpu_scan")
HAS_NUMBA = cpu_scan.available()
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")


# -- oracles ------------------------------------------------------------------------------------
def naive_s6(u, dt, A, B, C, D, h0=None):
    """Per-token float64 S6 loop -> (y [b, L, E], states [b, L, E, N], final [b, E, N])."""
    u, dt, A, B, C, D = (t.detach().double() for t in (u, dt, A, B, C, D))
    b, L, E = u.shape
    h = torch.zeros(b, E, A.shape[1], dtype=torch.float64) if h0 is None else h0.detach().double()
    ys, hs = [], []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
        hs.append(h)
    stack = lambda xs, shape: torch.stack(xs, 1) if xs else torch.zeros(shape, dtype=torch.float64)  # noqa: E731
    return stack(ys, (b, 0, E)), stack(hs, (b, 0, E, A.shape[1])), h


def naive_ssd(x, dt, A, B, C, D, h0=None):
    """Per-token float64 SSD loop -> (y [b, L, H, P], states [b, L, H, P, N], final [b, H, P, N])."""
    x, dt, A, B, C, D = (t.detach().double() for t in (x, dt, A, B, C, D))
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Bh, Ch = (t.repeat_interleave(H // G, dim=2) for t in (B, C))  # head h reads group h // (H / G)
    h = torch.zeros(b, H, P, N, dtype=torch.float64) if h0 is None else h0.detach().double()
    ys, hs = [], []
    for t in range(L):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs, 1), h


def close(actual, expected, rtol):
    """|actual − expected| ≤ rtol · (|expected| + max|expected|) everywhere (relative, with an absolute
    floor at the tensor's scale: outputs are sums that can cancel to ~0)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-30) if expected.numel() else torch.tensor(1.0)
    err = (actual - expected).abs()
    assert (err <= rtol * (expected.abs() + scale)).all(), f"max err {err.max().item():.3e}, scale {scale.item():.3e}, rtol {rtol}"


def s6_inputs(b, L, E, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, E, generator=g)
    dt = F.softplus(torch.randn(b, L, E, generator=g) - 1)
    A = -(torch.rand(E, N, generator=g) * 4 + 0.1)
    B, C = torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
    D = torch.randn(E, generator=g)
    h0 = torch.randn(b, E, N, generator=g)
    return [t.to(dtype) for t in (u, dt, A, B, C, D)], h0.to(dtype)


def ssd_inputs(b, L, H, P, N, G, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g)
    dt = F.softplus(torch.randn(b, L, H, generator=g) - 1)
    A = -(torch.rand(H, generator=g) * 4 + 0.1)
    B, C = torch.randn(b, L, G, N, generator=g), torch.randn(b, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g)
    return [t.to(dtype) for t in (x, dt, A, B, C, D)], h0.to(dtype)


def cut(inputs, lo, hi):
    """The positions lo..hi-1 of the per-position inputs (x/u, dt, B, C); A and D are shared."""
    x, dt, A, B, C, D = inputs
    return [x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], D]


# -- SSD ----------------------------------------------------------------------------------------
SSD_SPLITS = [  # (b, L, H, P, N, G, chunk, split points)
    (2, 37, 4, 3, 5, 2, 8, [13]),  # inside a chunk; L not a multiple of the chunk
    (2, 37, 4, 3, 5, 2, 8, [16]),  # exactly at a chunk boundary
    (1, 50, 6, 2, 4, 3, 16, [5, 16, 33]),  # several pieces, G = 3, inside and at boundaries
    (3, 24, 2, 4, 3, 1, 8, [8, 9]),  # a one-position piece
    (1, 70, 4, 2, 2, 2, 40, [40]),  # states path: two 64-position pieces (sub-blocks of 16, then one of 6)
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,L,H,P,N,G,T,splits", SSD_SPLITS)
def test_ssd_pieces_with_carried_state_equal_one_piece(b, L, H, P, N, G, T, splits, dtype, rtol):
    inputs, h0 = ssd_inputs(b, L, H, P, N, G, seed=L + T + len(splits), dtype=dtype)
    whole = ssd(*inputs, chunk_size=T, initial_state=h0, return_final_state=True, return_states=True)
    ref_y, ref_h, ref_final = naive_ssd(*inputs, h0=h0)
    close(whole.y, ref_y, rtol)
    close(whole.states, ref_h, rtol)
    close(whole.final_state, ref_final, rtol)

    state, ys, hs = h0, [], []
    for lo, hi in zip([0, *splits], [*splits, L]):
        piece = ssd(*cut(inputs, lo, hi), chunk_size=T, initial_state=state, return_final_state=True, return_states=True)
        state = piece.final_state
        ys.append(piece.y)
        hs.append(piece.states)
    close(torch.cat(ys, 1), whole.y, rtol)
    close(torch.cat(hs, 1), whole.states, rtol)
    close(state, whole.final_state, rtol)
    assert whole.y.dtype == dtype and whole.final_state.dtype == dtype and whole.path == "torch"


@pytest.mark.parametrize("T", [1, 4, 7, 32, 64])
def test_ssd_matches_the_loop_float64_for_any_chunk(T):
    """y, states and final state against the float64 loop to ~1e-12, with an initial state."""
    inputs, h0 = ssd_inputs(2, 45, 6, 3, 4, 2, seed=T)
    for init in (None, h0):
        out = ssd_torch(*inputs, chunk_size=T, initial_state=init, return_final_state=True, return_states=True)
        ref_y, ref_h, ref_final = naive_ssd(*inputs, h0=init)
        close(out.y, ref_y, 1e-12)
        close(out.states, ref_h, 1e-12)
        close(out.final_state, ref_final, 1e-12)
        # without states: the same y (the states path does not feed y)
        assert torch.equal(ssd_torch(*inputs, chunk_size=T, initial_state=init).y, out.y)


def test_ssd_float32_matches_the_loop():
    inputs, h0 = ssd_inputs(2, 130, 8, 4, 16, 2, seed=3, dtype=torch.float32)
    out = ssd(*inputs, chunk_size=32, initial_state=h0, return_final_state=True, return_states=True)
    ref_y, ref_h, ref_final = naive_ssd(*inputs, h0=h0)
    close(out.y, ref_y, 1e-5)
    close(out.states, ref_h, 1e-5)
    close(out.final_state, ref_final, 1e-5)


def strong_decay_case(L=32):
    """One head: Δ = 1000.1 for 30 steps, then 0.7; x = B = C = 1, A = −1, D = 0."""
    dt = torch.full((1, L, 1), 0.7)
    dt[:, :30] = 1000.1
    ones = torch.ones(1, L, 1, 1)
    return [ones, dt, -torch.ones(1), ones, ones, torch.zeros(1)]


@pytest.mark.parametrize("T", [32, 8, 5])
def test_ssd_strong_decay_is_exact_in_float32(T):
    """exp of a difference of prefix sums (≈ −30003) lost 2e-3 of the decay 0.7 over a step: the old
    code returned 248.055 for y_31 where the truth is 247.669 (rel 1.6e-3). Products over each span
    keep it exact, within a chunk (T = 32) and across chunk boundaries (T = 8, 5)."""
    inputs = strong_decay_case()
    ref_y, _, ref_final = naive_ssd(*inputs)
    assert ref_y[0, -1, 0, 0].item() == pytest.approx(247.669, abs=1e-3)
    out = ssd_torch(*inputs, chunk_size=T, return_final_state=True, return_states=True)
    assert out.y.dtype == torch.float32
    rel = ((out.y.double() - ref_y).abs() / ref_y.abs()).max().item()
    assert rel < 1e-5, rel
    close(out.final_state, ref_final, 1e-5)
    close(out.states[:, -1], ref_final, 1e-5)
    # and carried across a split right after the strong decay
    first = ssd_torch(*cut(inputs, 0, 30), chunk_size=T, return_final_state=True)
    second = ssd_torch(*cut(inputs, 30, 32), chunk_size=T, initial_state=first.final_state)
    rel = ((second.y.double() - ref_y[:, 30:]).abs() / ref_y[:, 30:].abs()).max().item()
    assert rel < 1e-5, rel


def test_segdecay_is_the_product_of_the_decays_over_each_span():
    a = -3 * torch.rand(3, 9, dtype=torch.float64)  # log decays Δ A
    e = a.exp()
    out = segdecay(a)
    for s in range(9):
        for l in range(9):  # noqa: E741
            want = torch.prod(e[:, s + 1:l + 1], dim=-1) if s <= l else torch.zeros(3, dtype=torch.float64)
            assert torch.allclose(out[:, s, l], want, rtol=1e-14, atol=0)
    unmasked = segdecay(a, masked=False)
    assert torch.equal(unmasked.triu(), out) and (unmasked.tril(-1) == torch.ones(9, 9).tril(-1)).all()
    # a decay that underflows cuts the spans across it (to a tiny normal number, e times the smallest, never
    # a subnormal, which is slow); nothing becomes inf or NaN
    for dtype in (torch.float64, torch.float32):
        a[:, 4] = -1e4
        out = segdecay(a.to(dtype))
        tiny = torch.finfo(dtype).tiny
        assert torch.isfinite(out).all() and ((out[:, :4, 4:] >= tiny) & (out[:, :4, 4:] <= 3 * tiny)).all()
        assert (out[:, 4, 4:] > 1e-10).all() and ((out == 0) | (out >= tiny)).all()


def test_ssd_step_iterated_equals_the_scan():
    inputs, h0 = ssd_inputs(2, 23, 6, 3, 4, 3, seed=5)
    x, dt, A, B, C, D = inputs
    state, ys = h0, []
    for t in range(x.shape[1]):
        y, state = ssd_state_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    out = ssd(*inputs, chunk_size=8, initial_state=h0, return_final_state=True)
    close(torch.stack(ys, 1), out.y, 1e-12)
    close(state, out.final_state, 1e-12)
    # float32 in, float32 state out; bfloat16 in: y in bfloat16, the state in float32
    y32, s32 = ssd_state_step(h0.float(), *(t[:, 0].float() for t in (x, dt)), A.float(), B[:, 0].float(), C[:, 0].float(), D.float())
    assert y32.dtype == s32.dtype == torch.float32
    yb, sb = ssd_state_step(h0.float(), x[:, 0].bfloat16(), dt[:, 0].bfloat16(), A, B[:, 0].bfloat16(), C[:, 0].bfloat16(), D)
    assert yb.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_ssd_empty_sequence_returns_the_initial_state():
    inputs, h0 = ssd_inputs(2, 0, 4, 3, 5, 2)
    out = ssd(*inputs, chunk_size=8, initial_state=h0, return_final_state=True, return_states=True)
    assert out.y.shape == (2, 0, 4, 3) and out.states.shape == (2, 0, 4, 3, 5)
    assert torch.equal(out.final_state, h0)
    assert torch.equal(ssd(*inputs, chunk_size=8, return_final_state=True).final_state, torch.zeros_like(h0))


def test_ssd_gradients_reach_the_initial_state():
    inputs, h0 = ssd_inputs(1, 11, 2, 2, 3, 1, seed=9)
    inputs = [t.requires_grad_() for t in inputs]
    h0.requires_grad_()

    def f(x, dt, A, B, C, D, h0):
        out = ssd_torch(x, dt, A, B, C, D, chunk_size=4, initial_state=h0, return_final_state=True, return_states=True)
        return out.y, out.final_state, out.states

    assert torch.autograd.gradcheck(f, (*inputs, h0))


def test_ssd_autograd_after_an_inference_mode_call():
    """The float masks are cached: one made under inference_mode must still serve a backward."""
    inputs, h0 = ssd_inputs(1, 13, 2, 2, 3, 1, seed=8, dtype=torch.float32)
    with torch.inference_mode():
        ssd_torch(*inputs, chunk_size=13, initial_state=h0, return_states=True)
    inputs = [t.requires_grad_() for t in inputs]
    out = ssd_torch(*inputs, chunk_size=13, initial_state=h0, return_states=True)
    (out.y.sum() + out.states.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


def test_ssd_half_precision_returns_input_dtype_y_and_float32_states():
    inputs, h0 = ssd_inputs(1, 20, 4, 2, 3, 2, seed=4, dtype=torch.bfloat16)
    out = ssd(*inputs, chunk_size=8, initial_state=h0, return_final_state=True, return_states=True)
    assert out.y.dtype == torch.bfloat16
    assert out.states.dtype == out.final_state.dtype == torch.float32
    ref = ssd(*(t.float() for t in inputs), chunk_size=8, initial_state=h0.float(), return_final_state=True)
    assert torch.equal(out.final_state, ref.final_state)


# -- S6 -----------------------------------------------------------------------------------------
S6_PATHS = ["torch"] + (["numba"] if HAS_NUMBA else [])


def run_s6(path, *inputs, **kw):
    if path == "numba":
        with torch.no_grad():
            out = selective_scan(*inputs, **kw)
    else:
        out = selective_scan_torch(*inputs, **kw)
    assert out.path == path
    return out


@pytest.mark.parametrize("path", S6_PATHS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,L,E,N,T,splits", [(2, 37, 5, 4, 8, [13]), (2, 37, 5, 4, 8, [16]), (1, 40, 40, 3, 0, [1, 20, 39]), (3, 9, 3, 2, 4, [4])])
def test_s6_pieces_with_carried_state_equal_one_piece(path, dtype, rtol, b, L, E, N, T, splits):
    inputs, h0 = s6_inputs(b, L, E, N, seed=L + E, dtype=dtype)
    whole = run_s6(path, *inputs, initial_state=h0, return_final_state=True, return_states=True, chunk_size=T)
    ref_y, ref_h, ref_final = naive_s6(*inputs, h0=h0)
    close(whole.y, ref_y, rtol)
    close(whole.states, ref_h, rtol)
    close(whole.final_state, ref_final, rtol)
    state, ys = h0, []
    for lo, hi in zip([0, *splits], [*splits, L]):
        piece = run_s6(path, *cut(inputs, lo, hi), initial_state=state, return_final_state=True, chunk_size=T)
        assert piece.states is None
        state = piece.final_state
        ys.append(piece.y)
    close(torch.cat(ys, 1), whole.y, rtol)
    close(state, whole.final_state, rtol)
    assert whole.final_state.dtype == dtype


@needs_numba
def test_numba_scan_initial_and_final_state():
    inputs, h0 = s6_inputs(2, 30, 70, 4, seed=1)  # 3 channel tiles, the last one partial
    ref_y, ref_h, ref_final = naive_s6(*inputs, h0=h0)
    numba_scan = cpu_scan.selective_scan_numba
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        args = [t.to(dtype) for t in inputs]
        y, h, final = numba_scan(*args, return_states=True, initial_state=h0.to(dtype), return_final_state=True)
        close(y, ref_y, rtol)
        close(h, ref_h, rtol)
        close(final, ref_final, rtol)
        assert final.dtype == dtype
        y2, final2 = numba_scan(*args, initial_state=h0.to(dtype), return_final_state=True)
        assert torch.equal(y2, y) and torch.equal(final2, final)
        assert torch.equal(numba_scan(*args, initial_state=h0.to(dtype)), y)  # y alone, as before
    # without an initial state the final state is the last per-position state
    y, h, final = numba_scan(*inputs, return_states=True, return_final_state=True)
    assert torch.equal(final, h[:, -1])
    # an empty sequence returns the initial state; a wrong shape is refused
    u, dt, A, B, C, D = inputs
    _, final = numba_scan(u[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D, initial_state=h0, return_final_state=True)
    assert torch.equal(final, h0)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        numba_scan(*inputs, initial_state=h0[:, :, :2])
    with pytest.raises(RuntimeError, match="initial_state"):
        numba_scan(*inputs, initial_state=h0.clone().requires_grad_())


def test_s6_step_iterated_equals_the_scan():
    inputs, h0 = s6_inputs(2, 19, 6, 4, seed=2)
    u, dt, A, B, C, D = inputs
    state, ys = h0, []
    for t in range(u.shape[1]):
        y, state = selective_state_step(state, u[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    for path in S6_PATHS:
        out = run_s6(path, *inputs, initial_state=h0, return_final_state=True)
        close(torch.stack(ys, 1), out.y, 1e-12)
        close(state, out.final_state, 1e-12)


def test_s6_gradients_reach_the_initial_state():
    inputs, h0 = s6_inputs(1, 9, 3, 2, seed=6)
    inputs = [t.requires_grad_() for t in inputs]
    h0.requires_grad_()

    def f(*args):
        out = selective_scan(*args[:6], initial_state=args[6], return_final_state=True, chunk_size=4)
        assert out.path == "torch"  # grad mode on and inputs need grad: the autograd path
        return out.y, out.final_state

    assert torch.autograd.gradcheck(f, (*inputs, h0))


def test_s6_empty_sequence_returns_the_initial_state():
    inputs, h0 = s6_inputs(2, 0, 3, 2)
    for path in S6_PATHS:
        out = run_s6(path, *inputs, initial_state=h0, return_final_state=True, return_states=True)
        assert out.y.shape == (2, 0, 3) and out.states.shape == (2, 0, 3, 2)
        assert torch.equal(out.final_state, h0)


# -- the result type ----------------------------------------------------------------------------
def test_scan_out_fields():
    inputs, _ = ssd_inputs(1, 5, 2, 2, 2, 1)
    out = ssd(*inputs, chunk_size=4)
    assert isinstance(out, ScanOut) and out._fields == ("y", "states", "final_state", "path")
    assert out.states is None and out.final_state is None
    assert out[0] is out.y and out[1] is out.states and out[-1] == out.path == "torch"
    s6_out = selective_scan(*s6_inputs(1, 5, 2, 2)[0])
    assert s6_out[0] is s6_out.y and s6_out[1] is None and s6_out[-1] == s6_out.path
    assert s6_out.final_state is None


# -- causal conv --------------------------------------------------------------------------------
def conv_inputs(b=2, L=11, C=5, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, K, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    prefix = torch.randn(b, C, K - 1, generator=g, dtype=torch.float64)
    return x, w, bias, prefix


def naive_conv(x, w, bias, prefix):
    """out[t] = bias + Σ_j w[:, 0, j] · seq[t + j], seq = prefix followed by x (an explicit loop)."""
    seq = torch.cat([prefix, x.transpose(1, 2)], dim=-1)  # [b, C, K - 1 + L]
    K = w.shape[-1]
    out = torch.stack([(seq[..., t:t + K] * w[:, 0]).sum(-1) + bias for t in range(x.shape[1])], dim=1)
    return out  # [b, L, C]


@pytest.mark.parametrize("K", [1, 2, 4])
def test_conv_with_prefix_pieces_and_steps(K):
    x, w, bias, prefix = conv_inputs(K=K)
    out, final, path = causal_conv1d(x, w, bias, initial_state=prefix)
    assert path == "torch" and final is None
    close(out, naive_conv(x, w, bias, prefix), 1e-12)
    # no prefix = a zero prefix
    close(causal_conv1d(x, w, bias)[0], naive_conv(x, w, bias, torch.zeros_like(prefix)), 1e-12)
    # pieces: the final conv state of one piece is the prefix of the next
    # (the final state the conv returns, including a one-token piece's decoding step, is the prefix of the next)
    state, outs = prefix, []
    for lo, hi in ((0, 1), (1, 3), (3, 7), (7, 11)):  # pieces shorter and longer than K - 1
        piece = x[:, lo:hi]
        conv = causal_conv1d(piece, w, bias, initial_state=state, return_final_state=True)
        assert causal_conv1d(piece, w, bias, initial_state=state).final_state is None  # only when asked
        outs.append(conv.out)
        state = causal_conv1d_final_state(piece, K, initial_state=state)
        assert state.shape == (2, 5, K - 1) and torch.equal(conv.final_state, state)
    close(torch.cat(outs, 1), out, 1e-12)
    assert torch.equal(causal_conv1d(x, w, bias, return_final_state=True).final_state, causal_conv1d_final_state(x, K))
    # steps
    state, steps = prefix, []
    for t in range(x.shape[1]):
        y_t, state = causal_conv1d_step(state, x[:, t], w, bias)
        steps.append(y_t)
    close(torch.stack(steps, 1), out, 1e-12)
    close(state, causal_conv1d_final_state(x, K, initial_state=prefix), 0)


def test_conv_final_state_is_the_last_inputs_zero_padded():
    x, _, _, prefix = conv_inputs(L=2, K=4)  # L < K - 1
    st = causal_conv1d_final_state(x, 4)
    assert torch.equal(st[..., 0], torch.zeros(2, 5, dtype=torch.float64))
    assert torch.equal(st[..., 1:], x.transpose(1, 2))
    st = causal_conv1d_final_state(x, 4, initial_state=prefix)
    assert torch.equal(st[..., :1], prefix[..., -1:]) and torch.equal(st[..., 1:], x.transpose(1, 2))
    x, _, _, prefix = conv_inputs(L=6, K=4)
    assert torch.equal(causal_conv1d_final_state(x, 4, initial_state=prefix), x[:, -3:].transpose(1, 2))
    assert causal_conv1d_final_state(x, 1).shape == (2, 5, 0)
    assert torch.equal(causal_conv1d_final_state(x[:, :0], 4, initial_state=prefix), prefix)


def test_cpu_states_steps_and_conv_do_not_touch_gpu_kernels():
    code = (
        "import sys, torch\n"
        "from diffmamba_interp import scan\n"
        "z = torch.zeros\n"
        "scan.ssd(z(1, 3, 2, 2), z(1, 3, 2), z(2), z(1, 3, 1, 2), z(1, 3, 1, 2), z(2), chunk_size=2,\n"
        "         initial_state=z(1, 2, 2, 2), return_final_state=True)\n"
        "scan.selective_scan(z(1, 3, 2), z(1, 3, 2), z(2, 2), z(1, 3, 2), z(1, 3, 2), z(2),\n"
        "                    initial_state=z(1, 2, 2), return_final_state=True)\n"
        "scan.ssd_state_step(z(1, 2, 2, 2), z(1, 2, 2), z(1, 2), z(2), z(1, 1, 2), z(1, 1, 2), z(2))\n"
        "scan.selective_state_step(z(1, 2, 2), z(1, 2), z(1, 2), z(2, 2), z(1, 2), z(1, 2), z(2))\n"
        "scan.causal_conv1d(z(1, 3, 2), z(2, 1, 4), z(2), initial_state=z(1, 2, 3))\n"
        "scan.causal_conv1d_step(z(1, 2, 3), z(1, 2), z(2, 1, 4), z(2))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'triton')]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout
