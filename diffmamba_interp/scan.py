"""The selective scans: Mamba-1's S6 scan and Mamba-2's chunked SSD, plus the causal conv.

Each public function picks one path and says which (returned as `path`):
  - "mamba_ssm" / "causal_conv1d": the CUDA kernels of the `gpu` extra (tensors on CUDA, kernels
    installed, no per-position state requested);
  - "numba": the compiled CPU S6 scan (`cpu_scan.py`) for inference (no autograd);
  - "torch": the vectorised PyTorch reference, which also carries autograd (training).
Like mamba-ssm's `ssd_minimal.py`, the kernels are a lazy try-import; one `if` picks the path.

Shapes (see config.py for the dimension letters):
  S6:  u, dt [batch, L, E]; A [E, N]; B, C [batch, L, N]; D [E] -> y [batch, L, E], states [batch, L, E, N]
  SSD: x [batch, L, H, P]; dt [batch, L, H]; A [H]; B, C [batch, L, G, N]; D [H]
       -> y [batch, L, H, P], states [batch, L, H, P, N]
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@functools.cache
def gpu_kernels() -> SimpleNamespace | None:
    """The mamba-ssm / causal-conv1d kernels, or None when they are not installed (never on CPU)."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_fn,
        selective_scan_fn=selective_scan_fn,
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
    )


@functools.cache
def _numba():
    """The compiled CPU scan module, or None when numba is unavailable."""
    try:
        from . import cpu_scan
    except ImportError:
        return None
    return cpu_scan if cpu_scan.available() else None


def _use_kernels(*tensors: Tensor) -> bool:
    return tensors[0].is_cuda and gpu_kernels() is not None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scans accumulate in float32 (float64 stays float64, for verification)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- causal depthwise conv ---------------------------------------------------------------------
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, str]:
    """Depthwise causal conv over time, before the activation.

    x [batch, L, C]; weight [C, 1, K] (nn.Conv1d layout); bias [C] -> [batch, L, C].
    out[t, c] = bias[c] + Σ_j weight[c, 0, j] · x[t − (K − 1) + j, c]   (x = 0 before the start)
    """
    L = x.shape[1]
    if _use_kernels(x):
        out = gpu_kernels().causal_conv1d_fn(x.transpose(1, 2).contiguous(), weight.squeeze(1), bias, activation=None)
        return out.transpose(1, 2), "causal_conv1d"
    K = weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=x.shape[-1])[..., :L]
    return out.transpose(1, 2), "torch"


# -- Mamba-1: the S6 selective scan ------------------------------------------------------------
def selective_scan(u, dt, A, B, C, D, *, return_states: bool = False, chunk_size: int = 0):
    """S6: h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t,  y_t = C_t · h_t + D ⊙ u_t  (SPEC §1).

    Returns (y [batch, L, E], states [batch, L, E, N] or None, path).
    """
    if _use_kernels(u) and not return_states:
        y = gpu_kernels().selective_scan_fn(
            u.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A.float(),
            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
            z=None, delta_bias=None, delta_softplus=False,
        )
        return y.transpose(1, 2).to(u.dtype), None, "mamba_ssm"
    if not u.is_cuda and not _needs_grad(u, dt, A, B, C, D) and _numba() is not None:
        out = _numba().selective_scan_numba(u, dt, A, B, C, D, return_states=return_states)
        y, states = out if return_states else (out, None)
        return y, states, "numba"
    y, states = selective_scan_torch(u, dt, A, B, C, D, return_states=return_states, chunk_size=chunk_size)
    return y, states, "torch"


def selective_scan_torch(u, dt, A, B, C, D, *, return_states: bool = False, chunk_size: int = 0):
    """The PyTorch S6 scan, vectorised as a two-level scan (autograd-friendly reference).

    Split L into c chunks of T. Pass 1 runs the recurrence over the T positions of every chunk at
    once (zero start state); pass 2 carries the chunk-start states over the c chunks; then
    h_t = h_t^local + exp(Σ_{chunk start..t} Δ A) ⊙ h_start. That is T + c Python steps instead of L,
    and only exponentials of non-positive numbers (no overflow, no exp-then-mask).
    """
    dtype = u.dtype
    f = compute_dtype(dtype)
    u, dt, A, B, C, D = (t.to(f) for t in (u, dt, A, B, C, D))
    b, L, E = u.shape
    T = chunk_size or max(8, int(math.sqrt(L)))
    c = -(-L // T)
    pad = c * T - L
    dA = dt.unsqueeze(-1) * A  # [b, L, E, N]   log decay, ≤ 0
    dBu = (dt * u).unsqueeze(-1) * B.unsqueeze(2)  # [b, L, E, N]
    if pad:
        dA, dBu = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (dA, dBu))
    dA = dA.view(b, c, T, E, -1)
    dBu = dBu.view(b, c, T, E, -1)
    decay = torch.exp(dA)  # [b, c, T, E, N]
    h = torch.zeros_like(dBu[:, :, 0])  # [b, c, E, N]
    local = []
    for t in range(T):  # pass 1: every chunk in parallel
        h = decay[:, :, t] * h + dBu[:, :, t]
        local.append(h)
    local = torch.stack(local, dim=2)  # [b, c, T, E, N]
    cum = torch.exp(torch.cumsum(dA, dim=2))  # [b, c, T, E, N]  decay from chunk start to t
    start = torch.zeros_like(h[:, 0])  # [b, E, N]
    starts = []
    for k in range(c):  # pass 2: carry states across chunks
        starts.append(start)
        start = cum[:, k, -1] * start + local[:, k, -1]
    states = local + cum * torch.stack(starts, dim=1).unsqueeze(2)  # [b, c, T, E, N]
    states = states.view(b, c * T, E, -1)[:, :L]  # [b, L, E, N]
    y = torch.einsum("blen,bln->ble", states, C) + D * u  # [b, L, E]
    return y.to(dtype), (states if return_states else None)


# -- Mamba-2: chunked SSD ----------------------------------------------------------------------
def decay_matrix(cum: Tensor) -> Tensor:
    """cum [..., T] (a cumulative sum of log decays) -> [..., T, T] with out[l, s] = exp(cum[l] − cum[s])
    for s ≤ l and 0 above the diagonal, masked to −inf before the exponential (as mamba-ssm's kernels)."""
    T = cum.shape[-1]
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # [..., l, s]
    causal = torch.ones(T, T, dtype=torch.bool, device=cum.device).tril()
    return torch.exp(diff.masked_fill(~causal, -torch.inf))


def ssd(x, dt, A, B, C, D, *, chunk_size: int, return_states: bool = False):
    """SSD: h_t = exp(Δ_t A_h) h_{t−1} + Δ_t x_t ⊗ B_t,  y_t = h_t C_t + D_h x_t  (SPEC §1).

    Returns (y [batch, L, H, P], states [batch, L, H, P, N] or None, path).
    """
    if _use_kernels(x) and not return_states:
        y = gpu_kernels().mamba_chunk_scan_combined(
            x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
            D=D.float(), z=None, dt_bias=None, dt_softplus=False,
        )
        return y.to(x.dtype), None, "mamba_ssm"
    y, states = ssd_torch(x, dt, A, B, C, D, chunk_size=chunk_size, return_states=return_states)
    return y, states, "torch"


def ssd_torch(x, dt, A, B, C, D, *, chunk_size: int, return_states: bool = False):
    """The chunked SSD algorithm in PyTorch (after mamba-ssm's ssd_minimal.py).

    Letters: b batch, c chunk, l/s positions in a chunk (target/source), h head, g group, p head_dim,
    n state. Heads map to groups in contiguous blocks: head h reads group h // (H / G).
    """
    dtype = x.dtype
    f = compute_dtype(dtype)
    x, dt, A, B, C, D = (t.to(f) for t in (x, dt, A, B, C, D))
    b, L, H, P = x.shape
    G = B.shape[2]
    c = -(-L // chunk_size)  # chunks of at most chunk_size, as even as possible (padding < c)
    T = -(-L // c)
    pad = c * T - L
    Xdt = x * dt.unsqueeze(-1)  # [b, L, H, P]   Δ_s x_s
    Adt = A * dt  # [b, L, H]   log decay, ≤ 0
    if pad:
        Xdt = F.pad(Xdt, (0, 0, 0, 0, 0, pad))
        Adt = F.pad(Adt, (0, 0, 0, pad))
        B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C))
    Xdt = Xdt.view(b, c, T, G, H // G, P)  # heads split as (group, head-in-group)
    Bc = B.view(b, c, T, G, -1)  # [b, c, s, g, n]
    Cc = C.view(b, c, T, G, -1)  # [b, c, l, g, n]
    Acs = Adt.view(b, c, T, H).permute(0, 3, 1, 2)  # [b, h, c, l]
    Acum = torch.cumsum(Acs, dim=-1)  # [b, h, c, l]

    # 1. within chunks: y_l = Σ_{s≤l} (C_l·B_s) exp(A_{s+1..l}) Δ_s x_s
    Lmask = decay_matrix(Acum).view(b, G, H // G, c, T, T)  # [b, g, j, c, l, s]
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)  # [b, g, c, l, s]
    M = CB.unsqueeze(2) * Lmask  # [b, g, j, c, l, s]
    Y = torch.einsum("bgjcls,bcsgjp->bclgjp", M, Xdt)

    # 2. state contributed by each chunk, at its end
    decay_to_end = torch.exp(Acum[..., -1:] - Acum).view(b, G, H // G, c, T)  # [b, g, j, c, s]
    chunk_states = torch.einsum("bcsgn,bgjcs,bcsgjp->bcgjpn", Bc, decay_to_end, Xdt)

    # 3. carry states across chunks (c is small: a segment-sum over chunk boundaries)
    zeros = torch.zeros_like(chunk_states[:, :1])
    chunk_states = torch.cat([zeros, chunk_states], dim=1)  # [b, c+1, g, j, p, n]
    chunk_cum = torch.cumsum(F.pad(Acum[..., -1], (1, 0)), dim=-1)  # [b, h, c+1]
    decay_chunk = decay_matrix(chunk_cum).view(b, G, H // G, c + 1, c + 1)
    starts = torch.einsum("bgjzc,bcgjpn->bzgjpn", decay_chunk, chunk_states)[:, :-1]  # [b, c, g, j, p, n]

    # 4. start state -> output within each chunk
    decay_from_start = torch.exp(Acum).view(b, G, H // G, c, T)  # [b, g, j, c, l]
    Y = Y + torch.einsum("bclgn,bcgjpn,bgjcl->bclgjp", Cc, starts, decay_from_start)
    y = Y.reshape(b, c * T, H, P)[:, :L] + D.view(H, 1) * x

    states = None
    if return_states:  # h_l = exp(A_{start..l}) h_start + Σ_{s≤l} exp(A_{s+1..l}) Δ_s x_s ⊗ B_s
        local = torch.einsum("bgjcls,bcsgjp,bcsgn->bclgjpn", Lmask, Xdt, Bc)
        carried = torch.einsum("bgjcl,bcgjpn->bclgjpn", decay_from_start, starts)
        states = (local + carried).reshape(b, c * T, H, P, -1)[:, :L]
    return y.to(dtype), states
