"""A compiled CPU selective scan (Mamba-1 / S6) for inference, with numba.

    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] B_t[n] u_t[e]   (h_{-1} = initial state, or 0)
    y_t[e]    = Σ_n C_t[n] h_t[e, n] + D[e] u_t[e]

Shapes: u, delta [batch, L, E]; A [E, N]; B, C [batch, L, N]; D [E]; initial state [batch, E, N]
        -> y [batch, L, E] (and states [batch, L, E, N], h_t for every t; final state [batch, E, N],
        h_{L-1}).

No autograd: this is the inference path; `scan.selective_scan_torch` is the autograd path.

Design (measured on a 2-core AMD EPYC, see benchmarks/scan.py):
  * The kernel keeps the natural [batch, L, E] layout: no transposes. (A per-channel scalar loop
    over t took 0.17 s in this layout and 0.13 s on [batch, E, L] copies: the layout mattered far
    less than the scalar exp; see below.) Channels
    are cut into tiles of W = 32 adjacent ones; for every position t the kernel loops over the N
    states and, innermost, over the W channels of a tile, which are contiguous in u, delta, y and
    in the tile's copy of A (transposed to [N, W]): LLVM turns that loop into AVX code. The state
    is a small [N, W] local array per tile, loaded from the initial state before t = 0 and stored to
    the final state after t = L - 1; nothing of size [L, E, N] is built unless the states are asked
    for. Parallel jobs (prange): batch x tile when only y is wanted (the tile's state
    stays in L1), batch x thread when the states are written (each job walks t over a contiguous
    run of tiles, so each step writes one contiguous stretch of states[b, t]).
  * `math.exp` is a scalar libm call that LLVM cannot vectorise (numba has no vector math library
    here), and it dominated the run time (0.13-0.17 s for batch 1, L 1024, E 1536, N 16). The kernel
    uses its own branch-free exponential instead: Cody-Waite reduction x = k ln2 + f, |f| <= ln2/2,
    a polynomial for exp(f) evaluated in Estrin form (short dependency chains), and 2^k built from
    the exponent bits. Max relative error (checked against long-double exp over [-710, 80]):
    1.18e-7 in float32 (Cephes' expf coefficients), 2.21e-16 in float64 (degree-13 Taylor
    polynomial): under 1 ulp. The argument Δ A is <= 0, so nothing overflows; results below the
    smallest normal number (x < -126 ln 2 / -1022 ln 2) come out as 0, NaN stays NaN, positive
    arguments are right up to 88 / 709 (inf beyond).
  * fastmath=False: no reassociation and no FMA contraction, so every sum runs in the order written
    (y sums the states n = 0..N-1, like the reference loop).
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
    from numba.extending import overload
except ImportError:  # pragma: no cover - numba is a core dependency; this keeps `available()` honest
    numba = None

__all__ = ["available", "selective_scan_numba"]

_TILE = 32  # channels per work item: 4 AVX registers of float32 (8 of float64)


def available() -> bool:
    """True when numba can be imported (the compiled scan can run)."""
    return numba is not None


def _exp(x):
    """exp(x), branch-free so that LLVM vectorises loops calling it (numba overloads below)."""
    return math.exp(x)


if numba is not None:
    _LOG2E = 1.4426950408889634

    @overload(_exp, jit_options={"fastmath": False})
    def _exp_impl(x):
        if x == numba.types.float32:

            def exp_f32(x):
                lo = np.float32(-87.33654)  # ~ log(smallest normal float32) = -126 ln 2
                hi = np.float32(88.0)
                xc = lo if x < lo else x  # (NaN falls through both clamps)
                xc = hi if xc > hi else xc
                magic = np.float32(12582912.0)  # 1.5 * 2^23: adding it rounds to an integer
                tt = xc * np.float32(_LOG2E) + magic
                k = tt - magic
                ki = np.int32(np.float32(tt).view(np.int32) - np.int32(0x4B400000))
                f = xc - k * np.float32(0.693359375)  # Cody-Waite: ln2 = hi + lo
                f = f - k * np.float32(-2.12194440e-4)
                f2 = f * f
                f4 = f2 * f2
                q0 = np.float32(5.0000001201e-1) + np.float32(1.6666665459e-1) * f
                q1 = np.float32(4.1665795894e-2) + np.float32(8.3334519073e-3) * f
                q2 = np.float32(1.3981999507e-3) + np.float32(1.9875691500e-4) * f
                p = (q0 + f2 * q1) + f4 * q2
                p = (np.float32(1.0) + f) + f2 * p
                r = p * np.int32((ki + 127) << 23).view(np.float32)
                r = np.float32(0.0) if x < lo else r
                return np.float32(np.inf) if x > hi else r

            return exp_f32

        if x == numba.types.float64:

            def exp_f64(x):
                lo = -708.3964185322641  # ~ log(smallest normal float64) = -1022 ln 2
                hi = 709.0
                xc = lo if x < lo else x
                xc = hi if xc > hi else xc
                magic = 6755399441055744.0  # 1.5 * 2^52
                tt = xc * _LOG2E + magic
                k = tt - magic
                ki = np.float64(tt).view(np.int64) - np.int64(0x4338000000000000)
                f = xc - k * 6.93145751953125e-1
                f = f - k * 1.42860682030941723212e-6
                f2 = f * f
                f4 = f2 * f2
                f8 = f4 * f4
                # exp(f) = 1 + f + f^2 * sum_{i<12} f^i / (i + 2)!   (Taylor, error < 1e-17 for |f| <= ln2/2)
                q0 = 1.0 / 2.0 + (1.0 / 6.0) * f
                q1 = 1.0 / 24.0 + (1.0 / 120.0) * f
                q2 = 1.0 / 720.0 + (1.0 / 5040.0) * f
                q3 = 1.0 / 40320.0 + (1.0 / 362880.0) * f
                q4 = 1.0 / 3628800.0 + (1.0 / 39916800.0) * f
                q5 = 1.0 / 479001600.0 + (1.0 / 6227020800.0) * f
                p = ((q0 + f2 * q1) + f4 * (q2 + f2 * q3)) + f8 * (q4 + f2 * q5)
                p = (1.0 + f) + f2 * p
                r = p * np.int64((ki + 1023) << 52).view(np.float64)
                r = 0.0 if x < lo else r
                return np.inf if x > hi else r

            return exp_f64

        return None

    @njit(fastmath=False, cache=True)
    def _scan_job(u, dt, AT, B, C, D, h0, hT, y, states, write_states, b, first, count):
        """Scan channel tiles first..first+count-1 of batch row b over all positions (one parallel job),
        starting from h0[b] and leaving the last state in hT[b]."""
        L, E = u.shape[1], u.shape[2]
        N = AT.shape[0]
        W = _TILE
        # Lanes w..W-1 of a partial tile stay 0 (Δ = 0, A = 0: exp(0) * 0 + 0) and are never stored.
        h = np.zeros((count, N, W), dtype=y.dtype)
        at = np.zeros((count, N, W), dtype=y.dtype)  # A[e0:e0+w].T
        dd = np.zeros((count, W), dtype=y.dtype)
        for k in range(count):
            e0 = (first + k) * W
            w = min(W, E - e0)
            for n in range(N):
                for j in range(w):
                    at[k, n, j] = AT[n, e0 + j]
            for j in range(w):
                dd[k, j] = D[e0 + j]
                for n in range(N):
                    h[k, n, j] = h0[b, e0 + j, n]
        dl = np.zeros(W, dtype=y.dtype)  # Δ_t
        xl = np.zeros(W, dtype=y.dtype)  # Δ_t u_t
        yl = np.zeros(W, dtype=y.dtype)
        for t in range(L):
            for k in range(count):
                e0 = (first + k) * W
                w = min(W, E - e0)
                ut = u[b, t, e0:e0 + w]
                dtt = dt[b, t, e0:e0 + w]
                for j in range(w):
                    dl[j] = dtt[j]
                    xl[j] = dtt[j] * ut[j]
                for j in range(W):
                    yl[j] = 0.0
                hk = h[k]
                ak = at[k]
                for n in range(N):
                    bn = B[b, t, n]
                    cn = C[b, t, n]
                    for j in range(W):  # the vectorised loop
                        hv = _exp(dl[j] * ak[n, j]) * hk[n, j] + xl[j] * bn
                        hk[n, j] = hv
                        yl[j] += cn * hv
                yt = y[b, t, e0:e0 + w]
                for j in range(w):
                    yt[j] = yl[j] + dd[k, j] * ut[j]
                if write_states:  # the [N, W] tile -> the contiguous block states[b, t, e0:e0+w, :]
                    st = states[b, t]
                    for j in range(w):
                        for n in range(N):
                            st[e0 + j, n] = hk[n, j]
        for k in range(count):
            e0 = (first + k) * W
            for j in range(min(W, E - e0)):
                for n in range(N):
                    hT[b, e0 + j, n] = h[k, n, j]

    @njit(parallel=True, fastmath=False, cache=True)
    def _scan_kernel(u, dt, AT, B, C, D, h0, hT, y, states, write_states, groups):
        """u, dt, y [b, L, E]; AT [N, E]; B, C [b, L, N]; D [E]; h0, hT [b, E, N] (initial state in,
        final state out); states [b, L, E, N] (if written).

        The channels are cut into tiles of W; each batch row's tiles into `groups` contiguous runs, one
        parallel job each. A job walks t = 0..L-1 over its run of tiles (groups = number of tiles:
        one tile per job, whose state stays in L1; groups = threads: each t writes one contiguous
        stretch of states). The job body is a separate serial function: the parfor passes then see
        a one-line loop, which halves the compile time.
        """
        ntiles = (u.shape[2] + _TILE - 1) // _TILE
        for job in prange(u.shape[0] * groups):
            b = job // groups
            g = job % groups
            first = (ntiles * g) // groups
            count = (ntiles * (g + 1)) // groups - first
            _scan_job(u, dt, AT, B, C, D, h0, hT, y, states, write_states, b, first, count)


def _check(u, delta, A, B, C, D, initial_state) -> None:
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan_numba: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"selective_scan_numba: {name} is on {t.device}; the numba scan runs on CPU tensors only")
        if not t.is_floating_point():
            raise TypeError(f"selective_scan_numba: {name} has dtype {t.dtype}; expected a floating-point tensor")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        names = ", ".join(n for n, t in tensors.items() if t.requires_grad)
        raise RuntimeError(
            f"selective_scan_numba does not support autograd, but {names} require(s) grad: run it under "
            "torch.no_grad() / torch.inference_mode(), detach the inputs, or use the PyTorch scan "
            "(diffmamba_interp.scan.selective_scan_torch), which is the autograd path"
        )
    if u.dim() != 3:
        raise ValueError(f"selective_scan_numba: u must be [batch, L, E], got shape {tuple(u.shape)}")
    b, L, E = u.shape
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"selective_scan_numba: A must be [E={E}, N], got shape {tuple(A.shape)}")
    N = A.shape[1]
    expected = {"delta": (b, L, E), "B": (b, L, N), "C": (b, L, N), "D": (E,), "initial_state": (b, E, N)}
    for name, shape in expected.items():
        if name not in tensors:
            continue
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"selective_scan_numba: {name} must have shape {shape} (u {tuple(u.shape)}, A {tuple(A.shape)}), "
                f"got {tuple(tensors[name].shape)}"
            )


def selective_scan_numba(
    u, delta, A, B, C, D, return_states: bool = False, *, initial_state=None, return_final_state: bool = False
):
    """The S6 selective scan, compiled with numba and parallel over batch x channel tiles.

    u, delta: [batch, L, E]; A: [E, N] (negative); B, C: [batch, L, N]; D: [E]; initial_state:
    [batch, E, N] or None (zeros). CPU tensors of any floating dtype and any strides. Recurrence per
    channel e and state n:

        h_t = exp(delta_t[e] * A[e, n]) * h_{t-1} + delta_t[e] * B_t[n] * u_t[e]   (h_{-1} = initial_state)
        y_t[e] = sum_n C_t[n] * h_t[e, n] + D[e] * u_t[e]

    Accumulates in float64 when u is float64 and in float32 otherwise (float32 / bfloat16 / float16;
    the other inputs are cast to that dtype, like `scan.selective_scan_torch`). Returns y
    [batch, L, E] in u's dtype, and after it, in this order and only when asked: states
    [batch, L, E, N] (h_t for every t) and final_state [batch, E, N] (h_{L-1}; the initial state when
    L = 0), both in the accumulation dtype as `scan.selective_scan_torch` returns them. So y,
    (y, states), (y, final_state) or (y, states, final_state), as mamba-ssm's `return_last_state`.

    Raises RuntimeError when grad mode is on and an input requires grad (no autograd here). Uses
    min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS) threads. The first call per
    accumulation dtype compiles the kernel (cached on disk in __pycache__ afterwards).
    """
    if numba is None:
        raise ImportError("selective_scan_numba needs numba (pip install numba)")
    _check(u, delta, A, B, C, D, initial_state)
    out_dtype = u.dtype
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(acc).contiguous().numpy()

    b, L, E = u.shape
    N = A.shape[1]
    u_np, dt_np, B_np, C_np, D_np = (arr(t) for t in (u, delta, B, C, D))
    AT_np = arr(A.detach().t())  # [N, E]: contiguous over channels, like the kernel's inner loop
    y = torch.empty((b, L, E), dtype=acc)
    states = torch.empty((b, L, E, N) if return_states else (0, 0, 0, 0), dtype=acc)
    h0 = np.zeros((b, E, N), dtype=u_np.dtype) if initial_state is None else arr(initial_state)
    final = torch.empty((b, E, N), dtype=acc)
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)  # the first call also starts numba's thread pool, which (omp layer)
    if torch.get_num_threads() != torch_threads:  # sets OpenMP's thread count to NUMBA_NUM_THREADS,
        torch.set_num_threads(torch_threads)  # the count torch reads: put the user's setting back
    ntiles = -(-E // _TILE)
    # Without states: one tile per job (its state stays in L1). With states: one run of tiles per
    # thread, so that every step writes one contiguous stretch of the [b, L, E, N] output.
    groups = max(1, min(ntiles, threads)) if return_states else max(1, ntiles)
    _scan_kernel(u_np, dt_np, AT_np, B_np, C_np, D_np, h0, final.numpy(), y.numpy(), states.numpy(), return_states, groups)
    out = (y.to(out_dtype),) + ((states,) if return_states else ()) + ((final,) if return_final_state else ())
    return out if len(out) > 1 else out[0]
