"""The selective scans: Mamba-1's S6 scan and Mamba-2's chunked SSD, the causal conv, and one-token
steps of all three (recurrent mode: run a sequence in pieces, carrying the state).

Each scan returns a `ScanOut(y, states, final_state, path)`; `path` says which implementation ran:
  - "mamba_ssm" / "causal_conv1d": the CUDA kernels of the `gpu` extra (tensors on CUDA, kernels
    installed, and the kernel supports what was asked; otherwise the PyTorch path runs);
  - "numba": the compiled CPU S6 scan (`cpu_scan.py`) for inference (no autograd);
  - "torch": the vectorised PyTorch implementation, which also carries autograd (training).
Like mamba-ssm's `ssd_minimal.py`, the kernels are a lazy try-import; one `if` picks the path.

Dimension letters (as config.py; SPEC §1):
  b batch   L sequence length   E channels (d_inner)   N state size   K conv kernel width
  H heads   P head_dim (E = H·P)   G groups of B, C   J = H / G heads per group (head h = g·J + j
  reads group g)   T chunk length   l, s target / source position inside a chunk   q sub-block length
  (in the conv, C is the channel count)

Shapes:
  S6:   u, dt [b, L, E]; A [E, N]; B, C [b, L, N]; D [E]
        -> y [b, L, E]; states [b, L, E, N] (h_t for every t); initial / final state [b, E, N]
  SSD:  x [b, L, H, P]; dt [b, L, H]; A [H]; B, C [b, L, G, N]; D [H]
        -> y [b, L, H, P]; states [b, L, H, P, N]; initial / final state [b, H, P, N]
  conv: x [b, L, C]; weight [C, 1, K] (nn.Conv1d layout); bias [C]; conv state [b, C, K − 1] (the
        last K − 1 inputs, oldest first)
The initial state is h_{−1} (zeros when not given); the final state is h_{L−1}. Scans accumulate in
float32 (float64 stays float64); y comes back in the input dtype, states in the accumulation dtype.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "ConvOut", "ScanOut", "causal_conv1d", "causal_conv1d_final_state", "causal_conv1d_step", "compute_dtype",
    "gpu_kernels", "scan_path", "segdecay", "selective_scan", "set_scan_path", "selective_scan_torch", "selective_state_step", "ssd",
    "ssd_state_step", "ssd_torch",
]


class ScanOut(NamedTuple):
    """What a scan returns (read it by attribute)."""

    y: Tensor  # [b, L, E] (S6) or [b, L, H, P] (SSD), in the input dtype
    states: Tensor | None  # h_t for every t (only when return_states)
    final_state: Tensor | None  # h_{L−1} (only when return_final_state)
    path: str  # "mamba_ssm", "numba" or "torch"


class ConvOut(NamedTuple):
    """What `causal_conv1d` returns (read it by attribute)."""

    out: Tensor  # [b, L, C], before the activation
    final_state: Tensor | None  # the last K − 1 inputs [b, C, K − 1] (only when return_final_state)
    path: str  # "causal_conv1d" or "torch"


# name in `gpu_kernels()` -> (module to import, attribute, the compiled extension it needs, or None)
_KERNELS = {
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn", "causal_conv1d_cuda"),
    # mamba-ssm's main (PR #977) makes the selective-scan extension opt-in: its Python wrapper imports
    # without it and raises only when called, so the extension itself is checked
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", "selective_scan_cuda"),
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined", None),
    # decoding: one token from a state (Triton; the conv one is a CUDA extension)
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update", None),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update", "causal_conv1d_cuda"),
}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the kernels refuse or downcast float64
SCAN_PATHS = ("auto", "torch", "kernel")
_path = {"now": "auto"}
_fallback_warned: set[str] = set()
_broken: dict[str, str] = {}  # kernel name -> why it could not be imported


def _import_kernel(name: str):
    """One kernel, imported on its own: a missing or ABI-broken one turns off only itself."""
    module, attr, extension = _KERNELS[name]
    try:
        if extension is not None:
            importlib.import_module(extension)
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError / RuntimeError from a broken extension
        _broken[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return None


@functools.cache
def gpu_kernels() -> SimpleNamespace | None:
    """The mamba-ssm / causal-conv1d kernels that import (each on its own; None for one that does not),
    or None when none does (never imported for CPU tensors)."""
    found = {name: _import_kernel(name) for name in _KERNELS}
    return SimpleNamespace(**found) if any(found.values()) else None


@functools.cache
def _numba():
    """The compiled CPU scan module, or None when numba is unavailable."""
    try:
        from . import cpu_scan
    except ImportError:
        return None
    return cpu_scan if cpu_scan.available() else None


def set_scan_path(path: str) -> None:
    """Which scan implementations run, process-wide: "auto" (default: the GPU kernels for CUDA tensors
    where they apply, numba for CPU inference), "torch" (PyTorch everywhere: one path for every run,
    e.g. a bf16 baseline that a `hook_ssm_state` hook, which forces PyTorch, can be compared with) or
    "kernel" (like auto, but a CUDA tensor that cannot use its kernel is an error, not a fallback)."""
    from .errors import DiffMambaError

    if path not in SCAN_PATHS:
        raise DiffMambaError(f"unknown scan path {path!r}; expected one of {', '.join(SCAN_PATHS)}")
    _path["now"] = path


def scan_path() -> str:
    return _path["now"]


def _fallback(name: str, why: str) -> bool:
    """A CUDA tensor takes the PyTorch path: an error under set_scan_path("kernel"), else one warning per kind."""
    if _path["now"] == "kernel":
        from .errors import DiffMambaError

        raise DiffMambaError(f"scan path 'kernel': {name} cannot run here ({why})")
    if why not in _fallback_warned:
        _fallback_warned.add(why)
        warnings.warn(f"CUDA tensors take the PyTorch path for {name}: {why}", stacklevel=3)
    return False


def _use_kernels(name: str, x: Tensor, supported: bool = True, why: str = "") -> bool:
    """Whether kernel `name` runs for x: CUDA tensors, the kernel imported, a dtype it takes, and what
    was asked within what it supports (`supported`, else `why` not)."""
    if not x.is_cuda or _path["now"] == "torch":
        return False
    kernels = gpu_kernels()
    if kernels is None or getattr(kernels, name) is None:
        return _fallback(name, f"{name} is not available ({_broken.get(name, 'not installed')})")
    if x.dtype not in KERNEL_DTYPES:
        return _fallback(name, f"{x.dtype} is not a kernel dtype (float16, bfloat16, float32)")
    if not supported:
        return _fallback(name, why)
    return True


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scans accumulate in float32 (float64 stays float64, for verification)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- causal depthwise conv ---------------------------------------------------------------------
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None,
                  return_final_state: bool = False) -> ConvOut:
    """Depthwise causal conv over time, before the activation. Returns ConvOut(out [b, L, C],
    final_state [b, C, K − 1] or None, path).

    x [b, L, C]; weight [C, 1, K]; bias [C]; initial_state [b, C, K − 1]: the K − 1 inputs before x
    (zeros when None). out[t, c] = bias[c] + Σ_j weight[c, 0, j] · x[t − (K − 1) + j, c]; final_state
    (with return_final_state): the last K − 1 inputs of initial_state followed by x.
    """
    L, K = x.shape[1], weight.shape[-1]
    width = (2 <= K <= 4, f"the conv kernel takes widths 2-4, not {K}")  # what both conv kernels support
    if initial_state is not None and L == 1:  # decoding: one token from the state, whose shifted window is the new state
        if not _needs_grad(x, weight, bias, initial_state) and _use_kernels("causal_conv1d_update", x, *width):
            window = initial_state.to(x.dtype).clone()  # the kernel shifts it in place; the caller's state is kept
            out = torch.compiler.disable(gpu_kernels().causal_conv1d_update)(x[:, 0], window, weight.squeeze(1), bias)
            return ConvOut(out.unsqueeze(1), window if return_final_state else None, "causal_conv1d")
        out, window = causal_conv1d_step(initial_state, x[:, 0], weight, bias)  # a K-tap dot product, not a conv call
        return ConvOut(out.unsqueeze(1), window if return_final_state else None, "torch")
    final = causal_conv1d_final_state(x, K, initial_state) if return_final_state else None
    if initial_state is None and _use_kernels("causal_conv1d_fn", x, *width):
        out = torch.compiler.disable(gpu_kernels().causal_conv1d_fn)(x.transpose(1, 2).contiguous(), weight.squeeze(1), bias, activation=None)
        return ConvOut(out.transpose(1, 2), final, "causal_conv1d")
    # K shifted multiply-adds in the [b, L, C] layout, not a conv1d call: no transposes, a contiguous
    # result, and 2-3x faster than the depthwise conv1d on CPU (whose input would be [b, C, L])
    seq = F.pad(x, (0, 0, K - 1, 0)) if initial_state is None else torch.cat([initial_state.to(x.dtype).transpose(1, 2), x], 1)
    taps = weight[:, 0].t()  # [K, C]
    out = seq[:, :L] * taps[0] if bias is None else torch.addcmul(bias, seq[:, :L], taps[0])
    for j in range(1, K):
        out.addcmul_(seq[:, j:j + L], taps[j])
    return ConvOut(out, final, "torch")


def causal_conv1d_final_state(x: Tensor, kernel_size: int, initial_state: Tensor | None = None) -> Tensor:
    """The conv state after x: its last K − 1 inputs, x [b, L, C] -> [b, C, K − 1] (oldest first).

    When L < K − 1 the older entries come from initial_state [b, C, K − 1] (zeros when None).
    """
    b, L, C = x.shape
    k = kernel_size - 1
    prefix = x.new_zeros(b, C, k) if initial_state is None else initial_state.to(x.dtype)
    seq = torch.cat([prefix, x[:, max(L - k, 0):].transpose(1, 2)], dim=-1)  # [b, C, k + min(L, k)]
    return seq[..., seq.shape[-1] - k:]


def causal_conv1d_step(conv_state: Tensor, x_t: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token of the causal conv: (out_t [b, C], new_conv_state [b, C, K − 1]).

    conv_state [b, C, K − 1] holds the previous K − 1 inputs; x_t [b, C]; weight [C, 1, K]; bias [C].
    """
    window = torch.cat([conv_state.to(x_t.dtype), x_t.unsqueeze(-1)], dim=-1)  # [b, C, K]
    out = (window * weight[:, 0]).sum(-1)
    return (out + bias if bias is not None else out), window[..., 1:]


# -- Mamba-1: the S6 selective scan ------------------------------------------------------------
def selective_scan(
    u, dt, A, B, C, D, *, initial_state=None, return_final_state=False, return_states=False, chunk_size=0
) -> ScanOut:
    """S6: h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t,  y_t = C_t · h_t + D ⊙ u_t  (SPEC §1).

    u, dt [b, L, E]; A [E, N]; B, C [b, L, N]; D [E]; initial_state [b, E, N] (h_{−1}; zeros when None).
    Returns ScanOut(y [b, L, E], states [b, L, E, N] or None, final_state [b, E, N] or None, path).
    The CUDA kernel takes no initial state, returns no per-position states and passes no gradient
    through its last state: those cases go to PyTorch.
    """
    final_grad = return_final_state and _needs_grad(u, dt, A, B, C, D)
    wants = not return_states and initial_state is None and not final_grad  # what the kernel can give
    if wants and _use_kernels("selective_scan_fn", u, A.shape[1] <= 256, f"the S6 kernel takes d_state <= 256, not {A.shape[1]}"):
        # Δ, B, C in u's dtype: under autocast softplus gives float32 Δ, a hook may return another dtype
        dt, B, C = (t.to(u.dtype) for t in (dt, B, C))
        out = torch.compiler.disable(gpu_kernels().selective_scan_fn)(
            u.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A.float(),
            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
            z=None, delta_bias=None, delta_softplus=False, return_last_state=return_final_state,
        )
        y, last = out if return_final_state else (out, None)  # last [b, E, N], float32
        final = last.to(compute_dtype(u.dtype)) if return_final_state else None
        return ScanOut(y.transpose(1, 2).to(u.dtype), None, final, "mamba_ssm")
    if (not u.is_cuda and _path["now"] != "torch" and not _needs_grad(u, dt, A, B, C, D, initial_state)
            and _numba() is not None):
        out = torch.compiler.disable(_numba().selective_scan_numba)(  # dynamo cannot trace into numba
            u, dt, A, B, C, D, initial_state=initial_state, return_states=return_states,
            return_final_state=return_final_state,
        )
        out = list(out) if isinstance(out, tuple) else [out]
        y = out.pop(0)
        states = out.pop(0) if return_states else None
        final = out.pop(0) if return_final_state else None
        return ScanOut(y, states, final, "numba")
    return selective_scan_torch(
        u, dt, A, B, C, D, initial_state=initial_state, return_final_state=return_final_state,
        return_states=return_states, chunk_size=chunk_size,
    )


def selective_scan_torch(
    u, dt, A, B, C, D, *, initial_state=None, return_final_state=False, return_states=False, chunk_size=0
) -> ScanOut:
    """The PyTorch S6 scan, vectorised as a two-level scan (autograd-friendly reference).

    Split L into c chunks of T. Pass 1 runs the recurrence over the T positions of every chunk at
    once (zero start state); pass 2 carries the chunk-start states over the c chunks, starting from
    initial_state; then h_t = h_t^local + exp(Σ_{chunk start..t} Δ A) ⊙ h_start. That is T + c
    Python steps instead of L, and only exponentials of non-positive numbers (no overflow, no
    exp-then-mask). Shapes as `selective_scan`.
    """
    dtype = u.dtype
    f = compute_dtype(dtype)
    u, dt, A, B, C, D = (t.to(f) for t in (u, dt, A, B, C, D))
    b, L, E = u.shape
    N = A.shape[1]
    start = u.new_zeros(b, E, N) if initial_state is None else initial_state.to(f)  # [b, E, N]
    if L == 0:
        states = u.new_zeros(b, 0, E, N) if return_states else None
        return ScanOut(u.to(dtype), states, start if return_final_state else None, "torch")
    T = chunk_size or max(8, int(math.sqrt(L)))
    c = -(-L // T)
    pad = c * T - L
    dA = dt.unsqueeze(-1) * A  # [b, L, E, N]   log decay, ≤ 0
    dBu = (dt * u).unsqueeze(-1) * B.unsqueeze(2)  # [b, L, E, N]
    if pad:  # padded steps: decay 1, input 0, so the carry passes them unchanged
        dA, dBu = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (dA, dBu))
    dA = dA.view(b, c, T, E, N)
    dBu = dBu.view(b, c, T, E, N)
    decay = torch.exp(dA)  # [b, c, T, E, N]
    h = torch.zeros_like(dBu[:, :, 0])  # [b, c, E, N]
    local = []
    # unbind, not indexing in the loop: the backward of one unbind stacks the T gradients once, where
    # T selects would each write a full-size zero tensor (10x slower backward at L = 1024)
    for decay_t, dBu_t in zip(decay.unbind(2), dBu.unbind(2)):  # pass 1: every chunk in parallel
        h = decay_t * h + dBu_t
        local.append(h)
    local = torch.stack(local, dim=2)  # [b, c, T, E, N]
    cum = torch.exp(torch.cumsum(dA, dim=2))  # [b, c, T, E, N]  decay from chunk start to t
    starts = []
    for cum_k, local_k in zip(cum[:, :, -1].unbind(1), local[:, :, -1].unbind(1)):  # pass 2: carry states across chunks
        starts.append(start)
        start = cum_k * start + local_k
    states = local + cum * torch.stack(starts, dim=1).unsqueeze(2)  # [b, c, T, E, N]
    states = states.view(b, c * T, E, N)[:, :L]  # [b, L, E, N]
    y = torch.einsum("blen,bln->ble", states, C) + D * u  # [b, L, E]
    return ScanOut(y.to(dtype), states if return_states else None, start if return_final_state else None, "torch")


def selective_state_step(state, u, dt, A, B, C, D, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """One token of S6: (y [b, E], new_state [b, E, N]); O(1) in the sequence length.

    state [b, E, N] (h_{t−1}); u, dt [b, E]; A [E, N]; B, C [b, N]; D [E]. On CUDA mamba-ssm's
    `selective_state_update` (Triton) runs it. The given state is never modified, unless `in_place`:
    then it becomes the new state (for a caller that owns it, as `generate` does: no state-sized
    allocation per token).
    """
    if _step_kernel(u, state, dt, A, B, C, D):
        new = state if in_place else state.clone()  # the kernel updates the state in place
        y = _call_step_kernel(new, u, dt, A, B, C, D, dt_bias=A.new_zeros(A.shape[0], dtype=torch.float32))  # [b, E]
        return y, new
    dtype = u.dtype
    f = compute_dtype(dtype)
    state, u, dt, A, B, C, D = (t.to(f) for t in (state, u, dt, A, B, C, D))
    decay = torch.exp(dt.unsqueeze(-1) * A)
    new = state.mul_(decay) if in_place else decay * state  # [b, E, N]   the input term added in place
    new.addcmul_((dt * u).unsqueeze(-1), B.unsqueeze(1))
    y = (new @ C.unsqueeze(-1)).squeeze(-1) + D * u  # [b, E]   C · h
    return y.to(dtype), new


def _step_kernel(x: Tensor, state: Tensor, *params: Tensor) -> bool:
    """Whether a one-token step runs mamba-ssm's selective_state_update (no autograd through it)."""
    return not _needs_grad(x, state, *params) and _use_kernels("selective_state_update", x)


def _tied(t: Tensor, *shape: int) -> Tensor:
    """t broadcast to `shape` along new trailing dimensions, as a stride-0 view (the kernel's tied form)."""
    return t.reshape(*t.shape, *(1,) * (len(shape) - t.ndim)).expand(*shape)


def _call_step_kernel(state, x, dt, A, B, C, D, dt_bias) -> Tensor:
    """selective_state_update(state, ...) -> y in x's dtype, the state (compute dtype) updated in place.
    Δ, B, C in x's dtype (autocast, hooks), A and D in float32 as the scan kernels take them. Δ is
    already softplus'ed; dt_bias is zeros, yet passed: mamba-ssm 2.3.2 fails to launch without one."""
    dt, B, C = (t.to(x.dtype) for t in (dt, B, C))
    return torch.compiler.disable(gpu_kernels().selective_state_update)(state, x, dt, A.float(), B, C, D.float(),
                                                                        dt_bias=dt_bias, dt_softplus=False)


# -- Mamba-2: chunked SSD ----------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tri_masks(T: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Float masks [T, T]: (s < l, s ≤ l). Multiplying by a float mask is far faster than triu / where.
    Cached, so made outside inference mode: an inference tensor cannot be saved for a later backward."""
    with torch.inference_mode(False):
        ones = torch.ones(T, T, dtype=dtype, device=device)
        return ones.triu(1), ones.triu()


def segdecay(a: Tensor, masked: bool = True) -> Tensor:
    """The decay over every span of a chunk from the per-step log decays a_k = Δ_k A ≤ 0,
    a [..., T] -> [..., T(s), T(l)] (source-major): out[s, l] = exp(Σ_{s<k≤l} a_k) = Π_{s<k≤l} e_k
    for s ≤ l (1 on the diagonal), 0 for s > l (1 there when not masked, for callers that fold the mask
    into a factor they multiply by anyway).

    mamba-ssm's stable segsum (ssd_minimal's): a cumulative sum down a masked copy, so each entry sums
    exactly the terms of its own span. A short span after a long strong decay keeps full precision
    (exp of a difference of two prefix sums does not), and nothing overflows (every sum is ≤ 0); a span
    whose decay underflows gets a tiny normal number instead (below).
    Source-major because torch's cumsum is fastest along the contiguous dimension (and about 4× its
    cumprod there: the sum, then one exp, beats a running product).
    """
    above, keep = _tri_masks(a.shape[-1], a.dtype, a.device)
    out = (a.unsqueeze(-2) * above).cumsum_(dim=-1)  # [..., s, l]: Σ over s < k ≤ l (0 for l ≤ s); one T×T tensor
    # a span that decays below e·(the smallest normal number) gets that instead of a subnormal or 0: exp
    # with subnormal results is ~3x slower, and a decay of 3e-38 (6e-308 in float64) is 0 to any sum it enters
    out = out.clamp_min_(math.log(torch.finfo(a.dtype).tiny) + 1).exp_()
    return out * keep if masked else out


# The PyTorch SSD's longest chunk, whatever the model's chunk_size (which the GPU kernel takes as is):
# the result is the same to rounding, and the within-chunk [T, T] work per head grows with T, so on
# CPU short chunks are faster (the 370M-shaped Mamba-2 forward on 2 threads: 256 -> 64 about 10%;
# benchmarks/ssd.py on 1 thread: 2x; BENCHMARKS.md).
TORCH_SSD_CHUNK = 64


def ssd(x, dt, A, B, C, D, *, chunk_size, initial_state=None, return_final_state=False, return_states=False) -> ScanOut:
    """SSD: h_t = exp(Δ_t A_h) h_{t−1} + Δ_t x_t ⊗ B_t,  y_t = h_t C_t + D_h x_t  (SPEC §1).

    x [b, L, H, P]; dt [b, L, H]; A [H]; B, C [b, L, G, N]; D [H]; initial_state [b, H, P, N].
    Returns ScanOut(y [b, L, H, P], states [b, L, H, P, N] or None, final_state [b, H, P, N] or None,
    path). Per-position states go to PyTorch; the CUDA kernel takes the initial and final states. The
    kernel runs chunks of `chunk_size`, the PyTorch path chunks of at most TORCH_SSD_CHUNK.
    """
    if not return_states and _use_kernels("mamba_chunk_scan_combined", x):
        dt, B, C = (t.to(x.dtype) for t in (dt, B, C))  # one dtype for the kernel (autocast, hooks)
        out = torch.compiler.disable(gpu_kernels().mamba_chunk_scan_combined)(
            x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
            D=D.float(), z=None, dt_bias=None, initial_states=initial_state, dt_softplus=False,
            return_final_states=return_final_state,
        )
        y, final = out if return_final_state else (out, None)  # final [b, H, P, N], float32
        final = final.to(compute_dtype(x.dtype)) if return_final_state else None
        return ScanOut(y.to(x.dtype), None, final, "mamba_ssm")
    return ssd_torch(
        x, dt, A, B, C, D, chunk_size=min(chunk_size, TORCH_SSD_CHUNK), initial_state=initial_state,
        return_final_state=return_final_state, return_states=return_states,
    )


def ssd_torch(x, dt, A, B, C, D, *, chunk_size, initial_state=None, return_final_state=False, return_states=False) -> ScanOut:
    """The chunked SSD algorithm in PyTorch (after mamba-ssm's ssd_minimal.py). Shapes as `ssd`.

    Chunks of T = chunk_size positions (the last one shorter), one after the other, carrying the
    state S [b, G, J, P, N] (a Python loop over the L / T chunks, never over positions). Per chunk,
    with e_k = exp(Δ_k A) and Dec = segdecay(Δ A) [s, l] the decay over each span:
      1. within the chunk: y_l = Σ_{s≤l} (C_l·B_s) Dec[s, l] Δ_s x_s          (a [T, T] per head)
      2. from the start state: y_l += (Π_{k≤l} e_k) C_l · S
      3. the state at the chunk end: S ← (Π_k e_k) S + Σ_s Dec[s, end] Δ_s x_s ⊗ B_s
    Steps 2 and 3 contract over all J·P columns of a group at once (one GEMM per group), the chunk's
    working set stays in cache, and no [T, T, P] or [T, P, N] tensor is built unless states are asked.
    """
    dtype = x.dtype
    f = compute_dtype(dtype)
    x, dt, A, B, C, D = (t.to(f) for t in (x, dt, A, B, C, D))
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    J = H // G
    X = (x * dt.unsqueeze(-1)).transpose(1, 2).contiguous().view(b, G, J, L, P)  # Δ_s x_s, head-major
    a = (dt * A).transpose(1, 2).contiguous().view(b, G, J, L)  # per-step log decays Δ_k A
    Bg, Cg = B.transpose(1, 2), C.transpose(1, 2)  # [b, G, L, N]
    S = x.new_zeros(b, G, J, P, N) if initial_state is None else initial_state.to(f).reshape(b, G, J, P, N)
    states = _ssd_states(a, X, Bg, S) if return_states else None
    ys = [x.new_empty(b, 0, G, J, P)]
    for t0 in range(0, L, chunk_size):
        t1 = min(t0 + chunk_size, L)
        ak, Xk, Bk, Ck = a[..., t0:t1], X[..., t0:t1, :], Bg[:, :, t0:t1], Cg[:, :, t0:t1]
        Dec = segdecay(ak, masked=False)  # [b, g, j, s, l]   (s > l: masked in CB)
        from_start = Dec[..., 0, :] * torch.exp(ak[..., :1])  # [b, g, j, l]   Π_{k≤l} e_k
        to_end = Dec[..., :, -1]  # [b, g, j, s]   Π_{s<k} e_k
        CB = torch.einsum("bgsn,bgln->bgsl", Bk, Ck) * _tri_masks(t1 - t0, f, x.device)[1]  # [b, g, s, l]   B_s·C_l, s ≤ l
        y = torch.einsum("bgjsl,bgjsp->bgjlp", Dec * CB.unsqueeze(2), Xk)  # 1. within the chunk
        y = torch.addcmul(y, torch.einsum("bgln,bgjpn->bgjlp", Ck, S), from_start.unsqueeze(-1))  # 2. from the start state
        ys.append(y.permute(0, 3, 1, 2, 4))  # [b, l, g, j, p]
        S = torch.addcmul(torch.einsum("bgjsp,bgsn->bgjpn", Xk * to_end.unsqueeze(-1), Bk), from_start[..., -1, None, None], S)  # 3.
    y = torch.addcmul(torch.cat(ys, dim=1).view(b, L, H, P), D.view(H, 1), x)  # [b, L, H, P]   + D x
    final = S.reshape(b, H, P, N) if return_final_state else None
    return ScanOut(y.to(dtype), states, final, "torch")


def _ssd_states(a: Tensor, X: Tensor, Bg: Tensor, S: Tensor, piece: int = 64) -> Tensor:
    """h_t for every position: a [b, G, J, L] log decays (Δ A), X [b, G, J, L, P] (Δ x), Bg [b, G, L, N],
    S [b, G, J, P, N] the initial state -> [b, L, H, P, N]. Pieces of 64 positions one after the
    other (each piece's last state starts the next), so that besides the result only one piece's
    worth of states is held: peak memory ≈ the states tensor + L / 64 of it.
    """
    b, G, J, L, P = X.shape
    out = X.new_empty(b, L, G, J, P, Bg.shape[-1])
    for t0 in range(0, L, piece):
        t1 = min(t0 + piece, L)
        h = _piece_states(a[..., t0:t1], X[..., t0:t1, :], Bg[:, :, t0:t1], S)  # [b, g, l, j, p, n]
        out[:, t0:t1].copy_(h.transpose(1, 2))
        S = h[:, :, -1].clone()  # (a view would keep the piece alive)
    return out.flatten(2, 3)


def _piece_states(a: Tensor, X: Tensor, Bk: Tensor, S: Tensor, q: int = 16) -> Tensor:
    """h_l for every position of a piece: a [b, G, J, l] log decays, X [b, G, J, l, P], Bk [b, G, l, N] and the
    state before it S [b, G, J, P, N] -> [b, G, l, J, P, N].

    Sub-blocks of q positions (m of them): inside each, Σ_s Dec[s, i] Δx_s ⊗ B_s from a zero start,
    one GEMM per sub-block and group ([q·J·P, q] @ [q, N]); across them, an [m, m] decay matrix
    carries the sub-block end states and the piece's start state. Work O(l·q·P·N), not O(l²·P·N);
    besides the result, the largest temporary is q / N of it.
    """
    b, G, J, l, P = X.shape
    N = Bk.shape[-1]
    q = min(q, l)
    m = -(-l // q)
    if m * q > l:  # padded positions: decay 1 (log 0), input 0
        a = F.pad(a, (0, m * q - l))
        X, Bk = F.pad(X, (0, 0, 0, m * q - l)), F.pad(Bk, (0, 0, 0, m * q - l))
    aq = a.view(b, G, J, m, q)
    Dec = segdecay(aq)  # [b, g, j, m, s, i]
    DX = Dec.permute(0, 1, 3, 5, 2, 4).unsqueeze(5) * X.view(b, G, J, m, q, P).permute(0, 1, 3, 2, 5, 4).unsqueeze(3)
    local = DX.reshape(b, G, m, q * J * P, q) @ Bk.view(b, G, m, q, N)  # [b, g, m, (i j p), n]   zero start
    local = local.view(b, G, m, q, J, P, N)
    del DX
    from_start = Dec[..., 0, :] * torch.exp(aq[..., :1])  # [b, g, j, m, i]   sub-block start -> i
    totals = aq.sum(-1)  # [b, g, j, m]   log decay over each sub-block
    ends = torch.einsum("bgjkm,bgkjpn->bgmjpn", segdecay(totals), local[:, :, :, -1].clone())  # [b, g, m, j, p, n]
    ends = ends + torch.cumsum(totals, dim=-1).exp().transpose(-1, -2)[..., None, None] * S.unsqueeze(2)
    starts = torch.cat([S.unsqueeze(2), ends[:, :, :-1]], dim=2)  # [b, g, m, j, p, n]   before each sub-block
    local.addcmul_(from_start.permute(0, 1, 3, 4, 2)[..., None, None], starts.unsqueeze(3))  # + carried-in state
    return local.view(b, G, m * q, J, P, N)[:, :, :l]


def ssd_state_step(state, x, dt, A, B, C, D, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """One token of SSD: (y [b, H, P], new_state [b, H, P, N]); O(1) in the sequence length.

    state [b, H, P, N] (h_{t−1}); x [b, H, P]; dt [b, H]; A [H]; B, C [b, G, N]; D [H]. On CUDA
    mamba-ssm's `selective_state_update` runs it in its multi-head form (A, Δ and D tied across the P
    channels of a head, stride-0 views as in mamba-ssm's `Mamba2.step`). The given state is never
    modified, unless `in_place` (as `selective_state_step`).
    """
    if _step_kernel(x, state, dt, A, B, C, D):
        b, H, P = x.shape
        N = state.shape[-1]
        new = state if in_place else state.clone()
        y = _call_step_kernel(new, x, _tied(dt.to(x.dtype), b, H, P), _tied(A.float(), H, P, N), B, C,
                              _tied(D.float(), H, P), dt_bias=_tied(A.new_zeros(H, dtype=torch.float32), H, P))
        return y, new
    dtype = x.dtype
    f = compute_dtype(dtype)
    state, x, dt, A, B, C, D = (t.to(f) for t in (state, x, dt, A, B, C, D))
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    state = state.view(b, G, H // G, P, N)
    decay = torch.exp(dt * A).view(b, G, H // G, 1, 1)
    dx = (dt.unsqueeze(-1) * x).view(b, G, H // G, P, 1)
    # a state is large (H·P·N per row): one new tensor, or none in place, and the input term added in place
    new = state.mul_(decay) if in_place else decay * state  # [b, g, j, p, n]
    new.addcmul_(dx, B.view(b, G, 1, 1, N))
    y = torch.einsum("bgjpn,bgn->bgjp", new, C).reshape(b, H, P) + D.view(H, 1) * x
    return y.to(dtype), new.reshape(b, H, P, N)
