"""The numba CPU selective scan against an independent per-token PyTorch loop."""

from __future__ import annotations

import itertools

import pytest
import torch

cpu_scan = pytest.importorskip("diffmamba_interp.cpu_scan")
if not cpu_scan.available():  # pragma: no cover - numba is a core dependency
    pytest.skip("numba is not installed", allow_module_level=True)

from diffmamba_interp.cpu_scan import selective_scan_numba  # noqa: E402


def naive_scan(u, delta, A, B, C, D):
    """Per-token float64 loop straight from the recurrence; returns (y [b, L, E], states [b, L, E, N])."""
    u, delta, A, B, C, D = (t.detach().double() for t in (u, delta, A, B, C, D))
    b, L, E = u.shape
    h = torch.zeros(b, E, A.shape[1], dtype=torch.float64)
    ys, hs = [], []
    for t in range(L):
        dt = delta[:, t, :, None]  # [b, E, 1]
        h = torch.exp(dt * A) * h + dt * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs, 1)


def make_inputs(b, L, E, N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, E, generator=g)
    delta = torch.rand(b, L, E, generator=g) * 0.5 + 1e-3  # positive, like softplus(...)
    A = -(torch.rand(E, N, generator=g) * 8 + 0.1)  # negative
    B = torch.randn(b, L, N, generator=g)
    C = torch.randn(b, L, N, generator=g)
    D = torch.randn(E, generator=g)
    return [t.to(dtype) for t in (u, delta, A, B, C, D)]


def assert_close_scaled(actual, expected, rtol):
    """|actual - expected| <= rtol * (|expected| + max|expected|): relative, with an absolute floor set
    by the tensor's scale (y is a sum over states, so single entries can cancel to ~0)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + scale)
    assert torch.isfinite(actual).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, scale {scale.item():.3e}, rtol {rtol}"


SHAPES = list(itertools.product((1, 3), (1, 7, 130), (5, 64), (1, 4, 16)))  # batch, L, E, N


@pytest.mark.parametrize("b,L,E,N", SHAPES)
def test_matches_naive_loop_float64_and_float32(b, L, E, N):
    inputs = make_inputs(b, L, E, N, seed=b * 1000 + L * 10 + E + N)
    ref_y, ref_h = naive_scan(*inputs)

    y64, h64 = selective_scan_numba(*[t.double() for t in inputs], return_states=True)
    assert y64.dtype == h64.dtype == torch.float64
    assert y64.shape == (b, L, E) and h64.shape == (b, L, E, N)
    assert_close_scaled(y64, ref_y, 1e-12)
    assert_close_scaled(h64, ref_h, 1e-12)

    y32, h32 = selective_scan_numba(*inputs, return_states=True)
    assert y32.dtype == h32.dtype == torch.float32
    assert_close_scaled(y32, ref_y, 1e-5)
    assert_close_scaled(h32, ref_h, 1e-5)
    # y without states runs the same arithmetic: identical bits.
    assert torch.equal(selective_scan_numba(*inputs), y32)


def test_many_channel_tiles_with_a_partial_one():
    """E = 200: 7 tiles of 32 channels, the last one partial. With states, each job runs several tiles."""
    inputs = make_inputs(2, 9, 200, 4, seed=21)
    ref_y, ref_h = naive_scan(*inputs)
    y = selective_scan_numba(*inputs)
    assert_close_scaled(y, ref_y, 1e-5)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # 1 or 2 runs of tiles per batch row
            torch.set_num_threads(threads)
            y_s, h = selective_scan_numba(*inputs, return_states=True)
            assert torch.equal(y_s, y)
            assert_close_scaled(h, ref_h, 1e-5)
    finally:
        torch.set_num_threads(before)


def test_non_contiguous_inputs_give_the_same_result():
    b, L, E, N = 2, 33, 40, 8
    u, delta, A, B, C, D = make_inputs(b, L, E, N, seed=7)
    # The same values behind other strides: transposed storage, every-other-element slices, expand.
    u_nc = u.transpose(1, 2).contiguous().transpose(1, 2)
    delta_nc = torch.stack([delta, delta], dim=-1)[..., 0]
    A_nc = A.t().contiguous().t()
    B_nc = torch.stack([B, torch.zeros_like(B)], dim=-1).flatten(-2)[..., ::2]
    C_nc = C.transpose(0, 1).contiguous().transpose(0, 1)
    D_nc = torch.stack([D, -D], dim=1)[:, 0]
    nc = (u_nc, delta_nc, A_nc, B_nc, C_nc, D_nc)
    assert not any(t.is_contiguous() for t in nc)
    for t, ref in zip(nc, (u, delta, A, B, C, D)):
        assert torch.equal(t, ref)
    y, h = selective_scan_numba(*nc, return_states=True)
    y_ref, h_ref = selective_scan_numba(u, delta, A, B, C, D, return_states=True)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert_close_scaled(y, naive_scan(u, delta, A, B, C, D)[0], 1e-5)

    # A batch-broadcast B (stride 0) works as well.
    B1 = B[:1].expand(b, L, N)
    assert B1.stride(0) == 0
    assert torch.equal(selective_scan_numba(u, delta, A, B1, C, D), selective_scan_numba(u, delta, A, B1.contiguous(), C, D))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_upcast_and_return_input_dtype(dtype):
    inputs = make_inputs(2, 20, 24, 4, seed=3, dtype=dtype)
    y, h = selective_scan_numba(*inputs, return_states=True)
    assert y.dtype == dtype  # y in the input dtype
    assert h.dtype == torch.float32  # states in the accumulation dtype, like scan.selective_scan_torch
    # Exactly: upcast the (half) values, scan in float32, round the output once.
    y32, h32 = selective_scan_numba(*[t.float() for t in inputs], return_states=True)
    assert torch.equal(y, y32.to(dtype))
    assert torch.equal(h, h32)
    ref_y, _ = naive_scan(*inputs)
    assert_close_scaled(y, ref_y, 1e-2)


def test_float64_is_float64_precision():
    inputs = make_inputs(1, 50, 16, 16, seed=11, dtype=torch.float64)
    y = selective_scan_numba(*inputs)
    assert y.dtype == torch.float64
    ref_y, _ = naive_scan(*inputs)
    err = (y - ref_y).abs().max().item()
    assert err < 1e-12 * ref_y.abs().max().item()
    # ... far below what a float32 computation gets.
    err32 = (selective_scan_numba(*[t.float() for t in inputs]).double() - ref_y).abs().max().item()
    assert err < err32 / 1e4


def test_extreme_decays_and_zero_A():
    b, L, E, N = 1, 40, 9, 3
    u, delta, A, B, C, D = make_inputs(b, L, E, N, seed=5, dtype=torch.float64)
    delta = delta * 1e3  # delta*A down to ~ -4e3: exp underflows to 0 (float32 and float64)
    A[0] = 0.0  # no decay: h is a running sum
    A[1] = -1e-9  # almost none
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype) for t in (u, delta, A, B, C, D)]
        y, h = selective_scan_numba(*args, return_states=True)
        ref_y, ref_h = naive_scan(*args)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close_scaled(y, ref_y, tol)
        assert_close_scaled(h, ref_h, tol)
        running = torch.cumsum(args[1][..., 0, None] * args[3] * args[0][..., 0, None], dim=1)
        assert_close_scaled(h[:, :, 0], running, tol)


def test_exp_accuracy_in_float32_and_float64():
    """u_0 = 1, then 0, with Δ = B = 1: h_1 = exp(A) exactly, the kernel's own exponential."""
    E, N = 1, 64
    A = -torch.logspace(-7, 2.5, N, dtype=torch.float64)  # exponents from -1e-7 to about -316 ...
    A = torch.cat([A, torch.tensor([-87.33, -87.34, -708.39, -708.4, -1e4], dtype=torch.float64)])[None]
    N = A.shape[1]  # ... and around the float32 / float64 underflow thresholds
    u = torch.zeros(1, 2, E, dtype=torch.float64)
    u[0, 0, 0] = 1.0
    for dtype, rtol in ((torch.float32, 2.5e-7), (torch.float64, 5e-16)):
        args = [t.to(dtype) for t in (u, torch.ones(1, 2, E), A, torch.ones(1, 2, N), torch.ones(1, 2, N), torch.zeros(E))]
        _, h = selective_scan_numba(*args, return_states=True)
        assert torch.equal(h[0, 0, 0], torch.ones(N, dtype=dtype))
        ref = torch.exp(args[2][0].double())  # exp of the rounded argument, in float64
        got = h[0, 1, 0].double()
        normal = ref > torch.finfo(dtype).tiny
        # float32: the 4 logspace exponents below -87.34 and -87.34, -708.39, -708.4, -1e4; float64: the last two
        assert (~normal).sum() == (8 if dtype == torch.float32 else 2)
        rel = ((got - ref) / ref)[normal].abs().max().item()
        assert rel < rtol, (dtype, rel)
        assert (got[~normal] <= torch.finfo(dtype).tiny).all()  # below the normal range: 0, never garbage


def test_grad_requiring_inputs_are_refused():
    inputs = make_inputs(1, 4, 3, 2)
    inputs[0].requires_grad_(True)
    inputs[2].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"does not support autograd.*u, A"):
        selective_scan_numba(*inputs)
    with torch.no_grad():
        y = selective_scan_numba(*inputs)
    with torch.inference_mode():
        assert torch.equal(selective_scan_numba(*inputs), y)
    assert not y.requires_grad
    assert torch.equal(y, selective_scan_numba(*[t.detach() for t in inputs]))


def test_bad_shapes_devices_and_dtypes_are_refused():
    u, delta, A, B, C, D = make_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError, match="delta must have shape"):
        selective_scan_numba(u, delta[:, :4], A, B, C, D)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_numba(u, delta, A.t(), B, C, D)
    with pytest.raises(ValueError, match="C must have shape"):
        selective_scan_numba(u, delta, A, B, C[..., :2], D)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan_numba(u[0], delta, A, B, C, D)
    with pytest.raises(TypeError, match="floating-point"):
        selective_scan_numba(u, delta, A, B, C, D.long())
    with pytest.raises(ValueError, match="meta"):
        selective_scan_numba(u.to("meta"), delta, A, B, C, D)


def test_empty_sequence_and_thread_count():
    import numba

    u, delta, A, B, C, D = make_inputs(2, 0, 4, 3)
    y, h = selective_scan_numba(u, delta, A, B, C, D, return_states=True)
    assert y.shape == (2, 0, 4) and h.shape == (2, 0, 4, 3)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        selective_scan_numba(*make_inputs(1, 3, 4, 2))
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    selective_scan_numba(*make_inputs(1, 3, 4, 2))
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


def test_benchmark_chunked_scan_matches():
    """benchmarks/scan.py's two-level PyTorch scan (a library candidate) against the naive loop."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scan.py"
    spec = importlib.util.spec_from_file_location("_bench_scan", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for (b, L, E, N), T in (((2, 37, 6, 4), 8), ((1, 5, 3, 2), 32), ((1, 64, 4, 3), 8), ((2, 1, 3, 2), 4)):
        inputs = make_inputs(b, L, E, N, seed=L, dtype=torch.float64)
        ref_y, ref_h = naive_scan(*inputs)
        y, h = bench.selective_scan_chunked(*inputs, chunk_size=T, return_states=True)
        assert y.shape == (b, L, E) and h.shape == (b, L, E, N)
        assert_close_scaled(y, ref_y, 1e-12)
        assert_close_scaled(h, ref_h, 1e-12)
        assert torch.equal(bench.selective_scan_chunked(*inputs, chunk_size=T), y)
        assert_close_scaled(bench.selective_scan_loop(*inputs), ref_y, 1e-12)


def test_first_call_keeps_torchs_thread_count():
    """Starting numba's pool (omp layer) resets OpenMP's thread count; torch's setting must survive."""
    import subprocess
    import sys

    code = (
        "import torch, numba\n"
        "torch.set_num_threads(1)\n"
        "from diffmamba_interp.cpu_scan import selective_scan_numba\n"
        "x = torch.ones(1, 2, 3)\n"
        "y = selective_scan_numba(x, x, -torch.ones(3, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.ones(3))\n"
        "print(torch.get_num_threads(), numba.get_num_threads(), float(y.sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    torch_threads, numba_threads, total = out.stdout.split()
    assert (torch_threads, numba_threads) == ("1", "1")
    assert float(total) == pytest.approx(6 * (1 + 1 + torch.exp(torch.tensor(-1.0)).item() + 1))
