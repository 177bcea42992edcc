"""The implicit attention of a selective scan and of a whole mixer, as data-controlled causal
matrices over positions (Ali, Zimerman & Wolf 2024, "The Hidden Attention of Mamba Models";
Zimerman, Ali & Wolf 2024, "Explaining Modern Gated-Linear RNNs via a Unified Implicit Attention
Formulation"; definitions in docs/conventions.md, "Implicit attention").

Each mixer calls these with the values of its own hooks (`Mixer.implicit_attention`); the analysis
module `analysis/attention.py` only orchestrates. Letters: b batch, L = pos, E channels, H heads,
P head_dim, N state, G groups, K conv kernel; t the target (row), s the source (column) position.

- S6 (Mamba-1, per channel c): α_c[t,s] = Σ_n C_t[n]·exp(A[c,n]·(S_t[c] − S_s[c]))·Δ_s[c]·B_s[n].
- SSD (Mamba-2, per head h): α_h[t,s] = (C_t·B_s)_{group(h)}·exp(A_h·(S_t − S_s))·Δ_s[h].
- Whole block: diag(rows)·(α + diag(D))·diag(σ(v))·M with M the causal depthwise conv as an L×L
  banded matrix per channel, v = M x + b the conv output and `rows` the row scaling after the scan
  (the gate SiLU(z); for Mamba-2 w ⊙ SiLU(z_t) / rms_group(t)), plus the conv-bias term
  diag(rows)·(α + diag(D))·σ(v)·b.

Numerics: float32 (float64 for a float64 model), log-space decays from a segment sum, positions
s > t masked to −inf before the exponential. With `reduce` ("mean" / "absmean" over channels or
heads) maps are accumulated `chunk` channels at a time: memory O(b·chunk·L²).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .errors import DiffMambaError

Tensor = torch.Tensor

KINDS = ("s6", "block")
REDUCES = (None, "mean", "absmean")
# default chunk: about this many elements per [b, chunk, L, L] work buffer (256 MiB in float32)
CHUNK_ELEMENTS = 1 << 26


@dataclass
class ImplicitAttention:
    """A block-level implicit attention: output[b, t, c] = Σ_s matrix[b, c, t, s]·x[b, s, c] + bias[b, c, t].

    matrix: [batch, E, pos, pos] (or [batch, pos, pos] when reduced over channels)
    bias:   [batch, E, pos]      (or [batch, pos] when reduced), the conv-bias term
    reduce: None, "mean" or "absmean": how channels were aggregated (a reduced map cannot
            reconstruct anything; ``reconstruct`` then raises).
    """

    matrix: Tensor
    bias: Tensor
    reduce: Optional[str] = None

    def __post_init__(self) -> None:
        if self.reduce not in REDUCES:
            raise DiffMambaError(f"unknown reduce {self.reduce!r}; expected one of {REDUCES}")
        m, bias = self.matrix, self.bias
        want = 3 if self.reduce else 4
        if m.ndim != want or m.shape[-1] != m.shape[-2]:
            layout = "[batch, pos, pos]" if self.reduce else "[batch, E, pos, pos]"
            raise DiffMambaError(f"ImplicitAttention.matrix must be {layout}, got shape {tuple(m.shape)}")
        if tuple(bias.shape) != tuple(m.shape[:-1]):
            raise DiffMambaError(
                f"ImplicitAttention.bias must have shape {tuple(m.shape[:-1])} (matrix without its last dim), "
                f"got {tuple(bias.shape)}"
            )

    @property
    def n_pos(self) -> int:
        return self.matrix.shape[-1]

    def reconstruct(self, x: Tensor) -> Tensor:
        """x [batch, pos, E] (the in_proj x path, channels last like the hooks) -> [batch, pos, E]."""
        if self.reduce is not None:
            raise DiffMambaError(f"a map reduced over channels (reduce={self.reduce!r}) cannot reconstruct; use reduce=None")
        b, E, L, _ = self.matrix.shape
        if tuple(x.shape) != (b, L, E):
            raise DiffMambaError(f"reconstruct expects x of shape {(b, L, E)} [batch, pos, E], got {tuple(x.shape)}")
        out = torch.einsum("bcts,bsc->btc", self.matrix, x.to(self.matrix.dtype))
        return out + self.bias.transpose(1, 2)

    def combine(self, other: "ImplicitAttention", lam: Tensor) -> "ImplicitAttention":
        """self − λ·other (matrix and bias): the differential map of two branches."""
        return ImplicitAttention(self.matrix - lam * other.matrix, self.bias - lam * other.bias, self.reduce)


# -- the kernels: α for a chunk of channels / heads ---------------------------------------------
class Masks(NamedTuple):
    """Boolean [L(t), L(s)] masks, built once per call."""

    not_strict: Tensor  # s ≥ t
    upper: Tensor  # s > t: masked to −inf before every exponential


def masks(L: int, device) -> Masks:
    ones = torch.ones(L, L, dtype=torch.bool, device=device)
    return Masks(torch.triu(ones), torch.triu(ones, diagonal=1))


def segsum(x: Tensor, m: Masks) -> Tensor:
    """x [..., L] -> [..., L(t), L(s)], out[t, s] = Σ_{s<k≤t} x[k] for s < t, 0 elsewhere (not masked).

    A cumulative sum down each column of a masked copy, as in ssd_minimal's segsum: no difference
    of two large prefix sums, so short spans stay accurate however long the sequence.
    """
    L = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, L).masked_fill(m.not_strict, 0)  # [..., t, s] = x[t] for s < t
    return torch.cumsum(xx, dim=-2)


def alpha_s6(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, m: Masks) -> Tensor:
    """Mamba-1 α for a chunk of channels: dt [b, L, c] (Δ after softplus), A [c, N], B, C [b, L, N]
    -> α [b, c, L, L]."""
    d = dt.transpose(1, 2)  # [b, c, L]
    seg = segsum(d, m)  # [b, c, t, s]  S_t − S_s for s < t, 0 on/above the diagonal
    out = torch.zeros_like(seg)
    tmp = torch.empty_like(seg)
    for n in range(A.shape[1]):  # over the state dimension (N), not over positions
        torch.mul(seg, A[:, n].view(1, -1, 1, 1), out=tmp)  # A[c,n]·(S_t − S_s) ≤ 0
        tmp.masked_fill_(m.upper, -torch.inf).exp_()  # mask s > t to −inf, then exponentiate
        out.addcmul_(tmp, (C[:, :, n, None] * B[:, None, :, n]).unsqueeze(1))  # · C_t[n]·B_s[n]
    return out.mul_(d.unsqueeze(2))  # · Δ_s


def alpha_ssd(dt: Tensor, A: Tensor, CB: Tensor, groups: Tensor, m: Masks) -> Tensor:
    """Mamba-2 α for a chunk of heads: dt [b, L, c], A [c], CB [b, G, L, L] (C_t·B_s per group),
    groups [c] (group of each head) -> α [b, c, L, L]."""
    a = (dt * A).transpose(1, 2)  # [b, c, L]   A_h·Δ_t ≤ 0
    out = segsum(a, m).masked_fill_(m.upper, -torch.inf).exp_()  # exp(A_h·(S_t − S_s)), 0 above
    if CB.shape[1] == 1:
        out.mul_(CB)
    else:
        out.mul_(CB.index_select(1, groups))
    return out.mul_(dt.transpose(1, 2).unsqueeze(2))  # · Δ_s


def fold_block(alphaD: Tensor, sig: Tensor, w: Tensor, cbias: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Fold conv, activation and the row scaling into α + diag(D), channel by channel.

    alphaD [b, h, 1, L, L] (α + diag(D), shared by the p channels of a head; h = channels, p = 1 for
    Mamba-1); sig = σ(v) [b, h, p, L]; w [h, p, K] conv taps; cbias [h, p]; rows [b, h, p, L]
    -> (matrix = diag(rows)·(α + diag(D))·diag(σ(v))·M  [b, h·p, L, L],  bias = diag(rows)·(α + diag(D))·σ(v)·b
    [b, h·p, L]).  M[s, r] = w[K − 1 − (s − r)] for 0 ≤ s − r < K (the causal depthwise conv of
    scan.causal_conv1d), so (X·M)[t, r] = Σ_k X[t, r + k]·w[K − 1 − k]: one shifted product per tap.
    """
    b, h, p, L = sig.shape
    K = w.shape[-1]
    col = sig.unsqueeze(-1) * w[None, :, :, None, :]  # [b, h, p, L, K]  σ(v_s)·w_j
    out = alphaD * col[..., K - 1].unsqueeze(-2)  # [b, h, p, L, L]  tap k = 0
    for k in range(1, min(K, L)):  # over conv taps, not positions
        out[..., : L - k].addcmul_(alphaD[..., k:], col[..., k:, K - 1 - k].unsqueeze(-2))
    out.mul_(rows.unsqueeze(-1))
    bias = torch.einsum("bhts,bhps->bhpt", alphaD[:, :, 0], sig * cbias.view(1, h, p, 1)) * rows
    return out.view(b, h * p, L, L), bias.reshape(b, h * p, L)


def fold_block_mean(alphaD: Tensor, sig: Tensor, w: Tensor, cbias: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Σ over the p channels of each head, and over heads, of `fold_block`'s maps, without
    materialising a map per channel: Σ_p rows_p[t]·σ_p[s]·w_p[j] is a rank-p matrix product
    Q_j[t, s], so Σ_p matrix_p[t, r] = Σ_k (α + D)[t, r + k]·Q_{K−1−k}[t, r + k].

    Same arguments as `fold_block` -> (matrix summed over channels [b, L, L], bias summed [b, L]).
    """
    b, h, p, L = sig.shape
    K = w.shape[-1]
    A = alphaD[:, :, 0]  # [b, h, L, L]
    rw = rows.unsqueeze(2) * w.permute(0, 2, 1).unsqueeze(0).unsqueeze(-1)  # [b, h, K, p, L]  rows_p[t]·w_p[j]
    Q = rw.transpose(-1, -2) @ sig.unsqueeze(2)  # [b, h, K, L, L]  Σ_p rows_p[t]·w_p[j]·σ_p[s]
    out = torch.einsum("bhts,bhts->bts", A, Q[:, :, K - 1])
    for k in range(1, min(K, L)):
        out[..., : L - k] += torch.einsum("bhts,bhts->bts", A[..., k:], Q[:, :, K - 1 - k, :, k:])
    Qb = rows.transpose(-1, -2) @ (sig * cbias.unsqueeze(-1))  # [b, h, L, L]  Σ_p rows_p[t]·σ_p[s]·b_p
    return out, torch.einsum("bhts,bhts->bt", A, Qb)


class Accumulator:
    """Collects per-chunk maps [b, c, ...] of n channels/heads in order: into one preallocated
    [b, n, ...] tensor (reduce None), or as a running sum of x (or |x|) over c, divided by n."""

    def __init__(self, reduce, n: int):
        self.reduce, self.n, self.out, self.at = reduce, n, None, 0

    def add(self, x: Tensor) -> None:
        if self.reduce is None:
            if self.out is None:
                self.out = x.new_empty(x.shape[0], self.n, *x.shape[2:])
            self.out[:, self.at : self.at + x.shape[1]] = x
            self.at += x.shape[1]
            return
        self.add_sum((x.abs() if self.reduce == "absmean" else x).sum(1))

    def add_sum(self, s: Tensor) -> None:
        """Add a chunk already summed over its channels (reduce "mean" only)."""
        self.out = s if self.out is None else self.out.add_(s)

    def result(self) -> Tensor:
        return self.out if self.reduce is None else self.out / self.n


def default_chunk(b: int, L: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, b * L * L))


def conv_params(conv1d: nn.Conv1d, E: int, f: torch.dtype) -> tuple[Tensor, Tensor]:
    """Taps [E, K] and bias [E] of the first E (x) channels of a depthwise conv (zeros without bias)."""
    w = conv1d.weight.detach()[:E, 0, :].to(f)
    b = conv1d.bias.detach()[:E].to(f) if conv1d.bias is not None else torch.zeros(E, dtype=f, device=w.device)
    return w, b


# -- whole maps, called by the mixers -----------------------------------------------------------
def s6_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, reduce, chunk: int | None) -> Tensor:
    """Per-channel S6 maps: dt [b, L, E], A [E, N], B, C [b, L, N] -> [b, E, L, L] (or reduced [b, L, L])."""
    b, L, E = dt.shape
    m, step = masks(L, dt.device), chunk or default_chunk(b, L)
    acc = Accumulator(reduce, E)
    for c0 in range(0, E, step):
        c1 = min(E, c0 + step)
        acc.add(alpha_s6(dt[..., c0:c1], A[c0:c1], B, C, m))
    return acc.result()


def s6_block_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, conv_out: Tensor, rows: Tensor,
                 conv1d: nn.Conv1d, reduce, chunk: int | None) -> ImplicitAttention:
    """The whole Mamba-1 mixer up to the gate: dt [b, L, E], A [E, N], B, C [b, L, N], D [E], conv_out
    (v, before SiLU) [b, L, E], rows (the row scaling, e.g. SiLU(z)) [b, L, E]."""
    b, L, E = dt.shape
    f = dt.dtype
    m, step = masks(L, dt.device), chunk or default_chunk(b, L)
    sig = torch.sigmoid(conv_out).transpose(1, 2)  # σ(v) [b, E, L]
    rows = rows.transpose(1, 2)  # [b, E, L]
    wconv, cbias = conv_params(conv1d, E, f)
    mat, bias = Accumulator(reduce, E), Accumulator(reduce, E)
    for c0 in range(0, E, step):
        c1 = min(E, c0 + step)
        aD = alpha_s6(dt[..., c0:c1], A[c0:c1], B, C, m)  # [b, c, L, L]
        aD.diagonal(dim1=-2, dim2=-1).add_(D[c0:c1].view(1, -1, 1))  # α + diag(D)
        mm, bb = fold_block(aD.unsqueeze(2), sig[:, c0:c1, None], wconv[c0:c1, None], cbias[c0:c1, None],
                            rows[:, c0:c1, None])  # every channel its own "head" of one channel
        del aD
        mat.add(mm)
        bias.add(bb)
    return ImplicitAttention(mat.result(), bias.result(), reduce)


def _ssd_parts(dt: Tensor, A: Tensor, B: Tensor, C: Tensor):
    H, G = A.shape[0], B.shape[2]
    groups = torch.arange(H, device=dt.device) // (H // G)  # head h reads group h // (H / G)
    CB = torch.einsum("btgn,bsgn->bgts", C, B)  # [b, G, L, L]
    return groups, CB


def ssd_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, reduce, chunk: int | None) -> Tensor:
    """Per-head SSD maps: dt [b, L, H], A [H], B, C [b, L, G, N] -> [b, H, L, L] (or reduced [b, L, L])."""
    b, L, H = dt.shape
    m, step = masks(L, dt.device), chunk or default_chunk(b, L)
    groups, CB = _ssd_parts(dt, A, B, C)
    acc = Accumulator(reduce, H)
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        acc.add(alpha_ssd(dt[..., h0:h1], A[h0:h1], CB, groups[h0:h1], m))
    return acc.result()


def ssd_block_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, conv_out: Tensor, rows: Tensor,
                  conv1d: nn.Conv1d, head_dim: int, reduce, chunk: int | None) -> ImplicitAttention:
    """The whole Mamba-2 mixer up to its gated norm, per channel (channel e in head e // P):
    dt [b, L, H], A, D [H], B, C [b, L, G, N], conv_out (the x part of the conv output) [b, L, E],
    rows (w ⊙ SiLU(z_t) / rms_group(t)) [b, L, E]."""
    b, L, H = dt.shape
    E, P = conv_out.shape[-1], head_dim
    f = dt.dtype
    m, step = masks(L, dt.device), chunk or default_chunk(b, L)
    groups, CB = _ssd_parts(dt, A, B, C)
    sig = torch.sigmoid(conv_out).transpose(1, 2).reshape(b, H, P, L)  # σ(v), channel e = (head e // P, e % P)
    rows = rows.transpose(1, 2).reshape(b, H, P, L)
    wconv, cbias = conv_params(conv1d, E, f)
    wconv, cbias = wconv.view(H, P, -1), cbias.view(H, P)
    mat, bias = Accumulator(reduce, E), Accumulator(reduce, E)
    # whole heads per step, or `sub` channels of one head; the mean needs no per-channel maps, so whole heads
    heads_per, sub = max(1, step // P), (P if reduce == "mean" else min(step, P))
    for h0 in range(0, H, heads_per):
        h1 = min(H, h0 + heads_per)
        aD = alpha_ssd(dt[..., h0:h1], A[h0:h1], CB, groups[h0:h1], m)  # [b, hs, L, L]
        aD.diagonal(dim1=-2, dim2=-1).add_(D[h0:h1].view(1, -1, 1))  # α + diag(D)
        aD = aD.unsqueeze(2)  # [b, hs, 1, L, L]
        for p0 in range(0, P, sub):
            p1 = min(P, p0 + sub)
            parts = (aD, sig[:, h0:h1, p0:p1], wconv[h0:h1, p0:p1], cbias[h0:h1, p0:p1], rows[:, h0:h1, p0:p1])
            if reduce == "mean":  # sum over channels by matrix products (no per-channel maps)
                mm, bb = fold_block_mean(*parts)
                mat.add_sum(mm)
                bias.add_sum(bb)
            else:
                mm, bb = fold_block(*parts)
                mat.add(mm)
                bias.add(bb)
    return ImplicitAttention(mat.result(), bias.result(), reduce)
