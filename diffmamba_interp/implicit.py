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

Options (`MapOptions`): a window of target rows t0 ≤ t < t1 (all source columns s < L): only those
rows are computed, O(b·c·(t1 − t0)·L) per chunk of c channels, so the answer row (t = L − 1) of a
16k-token prompt costs O(L) per channel, not O(L²); `include_D` (the skip term diag(D)) and
`include_bias` (the conv-bias term) of the whole-block map. Zimerman et al.'s drawn form is
include_D=False, include_bias=False (`paper_form`); their |·| with min-max per map is `minmax_abs`.

Numerics: float32 (float64 for a float64 model), log-space decays from a segment sum, positions
s > t masked to −inf before the exponential. With `reduce` ("mean" / "absmean" over channels or
heads) maps are accumulated `chunk` channels at a time: memory O(b·chunk·T·L) for T target rows.
The output-space operator of a whole block (kind "output") is in `implicit_output.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .errors import DiffMambaError

Tensor = torch.Tensor

KINDS = ("s6", "block", "output")
REDUCES = (None, "mean", "absmean")
# default chunk: about this many elements per [b, chunk, L, L] work buffer (256 MiB in float32)
CHUNK_ELEMENTS = 1 << 26


@dataclass
class MapOptions:
    """What a map holds. rows: the target rows (t0, t1) to compute, None for all; include_D: the
    diag(D) skip term (None: the kind's default, False for "s6", True otherwise); include_bias: the
    conv-bias term (and for kind "output" the in_proj / out_proj biases)."""

    rows: Optional[tuple[int, int]] = None
    include_D: Optional[bool] = None
    include_bias: bool = True

    def window(self, L: int) -> tuple[int, int]:
        return (0, L) if self.rows is None else self.rows

    def with_D(self, kind: str) -> bool:
        return (kind != "s6") if self.include_D is None else bool(self.include_D)


@dataclass
class ImplicitAttention:
    """A block-level implicit attention: output[b, t, c] = Σ_s matrix[b, c, t, s]·x[b, s, c] + bias[b, c, t].

    matrix: [batch, E, T, pos] (or [batch, T, pos] when reduced over channels); T = pos unless a
            window of target rows was asked for
    bias:   [batch, E, T]      (or [batch, T] when reduced), the conv-bias term
    reduce: None, "mean" or "absmean": how channels were aggregated (a reduced map cannot
            reconstruct anything; ``reconstruct`` then raises).
    t0:     None for a full square map; else row i of the matrix is target t0 + i (a window).
    """

    matrix: Tensor
    bias: Tensor
    reduce: Optional[str] = None
    t0: Optional[int] = None

    def __post_init__(self) -> None:
        if self.reduce not in REDUCES:
            raise DiffMambaError(f"unknown reduce {self.reduce!r}; expected one of {REDUCES}")
        m, bias = self.matrix, self.bias
        want = 3 if self.reduce else 4
        square = self.t0 is None
        if m.ndim != want or (square and m.shape[-1] != m.shape[-2]) or (
                not square and not 0 <= self.t0 <= self.t0 + m.shape[-2] <= m.shape[-1]):
            layout = "[batch, pos, pos]" if self.reduce else "[batch, E, pos, pos]"
            if not square:
                layout = f"{layout[:-10]}T, pos] with t0 + T <= pos (t0 = {self.t0})"
            raise DiffMambaError(f"ImplicitAttention.matrix must be {layout}, got shape {tuple(m.shape)}")
        if tuple(bias.shape) != tuple(m.shape[:-1]):
            raise DiffMambaError(
                f"ImplicitAttention.bias must have shape {tuple(m.shape[:-1])} (matrix without its last dim), "
                f"got {tuple(bias.shape)}"
            )

    @property
    def n_pos(self) -> int:
        return self.matrix.shape[-1]

    @property
    def rows(self) -> range:
        """The target positions of the matrix's rows."""
        t0 = self.t0 or 0
        return range(t0, t0 + self.matrix.shape[-2])

    def reconstruct(self, x: Tensor) -> Tensor:
        """x [batch, pos, E] (the in_proj x path, channels last like the hooks) -> [batch, T, E] (rows)."""
        if self.reduce is not None:
            raise DiffMambaError(f"a map reduced over channels (reduce={self.reduce!r}) cannot reconstruct; use reduce=None")
        b, E, _, L = self.matrix.shape
        if tuple(x.shape) != (b, L, E):
            raise DiffMambaError(f"reconstruct expects x of shape {(b, L, E)} [batch, pos, E], got {tuple(x.shape)}")
        out = torch.einsum("bcts,bsc->btc", self.matrix, x.to(self.matrix.dtype))
        return out + self.bias.transpose(1, 2)

    def combine(self, other: "ImplicitAttention", lam: Tensor) -> "ImplicitAttention":
        """self − λ·other (matrix and bias): the differential map of two branches."""
        return ImplicitAttention(self.matrix - lam * other.matrix, self.bias - lam * other.bias, self.reduce, self.t0)


# -- the kernels: α for a chunk of channels / heads ---------------------------------------------
class Masks(NamedTuple):
    """Boolean [T(t), L(s)] masks for the target rows t0 ≤ t < t0 + T, built once per call."""

    not_strict: Tensor  # s ≥ t
    upper: Tensor  # s > t: masked to −inf before every exponential
    t0: int = 0

    @property
    def t1(self) -> int:
        return self.t0 + self.upper.shape[0]


def masks(L: int, device, t0: int = 0, t1: int | None = None) -> Masks:
    t = torch.arange(t0, L if t1 is None else t1, device=device)[:, None]
    s = torch.arange(L, device=device)[None, :]
    return Masks(s >= t, s > t, t0)


def segsum(x: Tensor, m: Masks) -> Tensor:
    """x [..., L] -> [..., T(t), L(s)], out[t, s] = Σ_{s<k≤t} x[k] for s < t, 0 elsewhere (not masked),
    for the target rows t0 ≤ t < t1 of `m`.

    A cumulative sum down each column of a masked copy of the window's rows, as in ssd_minimal's
    segsum, plus for columns s < t0 − 1 the sum over s < k < t0, a reverse cumulative sum from t0
    back to s: no difference of two large prefix sums (and x has one sign, Δ or Δ·A), so short spans
    stay accurate however long the sequence. For the full square (t0 = 0) this is exactly the
    masked column cumsum.
    """
    T, L = m.upper.shape
    t0 = m.t0
    xx = x[..., t0 : t0 + T].unsqueeze(-1).expand(*x.shape[:-1], T, L).masked_fill(m.not_strict, 0)
    out = torch.cumsum(xx, dim=-2)  # [..., t, s] = Σ_{max(s+1, t0) ≤ k ≤ t} x[k]
    if t0 > 1:  # columns s ≤ t0 − 2 also collect Σ_{s<k<t0} x[k], summed from k = t0 − 1 backwards
        out[..., : t0 - 1] += x[..., 1:t0].flip(-1).cumsum(-1).flip(-1).unsqueeze(-2)
    return out


def alpha_s6(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, m: Masks) -> Tensor:
    """Mamba-1 α for a chunk of channels: dt [b, L, c] (Δ after softplus), A [c, N], B, C [b, L, N]
    -> α [b, c, T, L] for the target rows of `m`."""
    d = dt.transpose(1, 2)  # [b, c, L]
    seg = segsum(d, m)  # [b, c, t, s]  S_t − S_s for s < t, 0 on/above the diagonal
    Cw = C[:, m.t0 : m.t1]  # [b, T, N]  C_t of the target rows
    out = torch.zeros_like(seg)
    tmp = torch.empty_like(seg)
    for n in range(A.shape[1]):  # over the state dimension (N), not over positions
        torch.mul(seg, A[:, n].view(1, -1, 1, 1), out=tmp)  # A[c,n]·(S_t − S_s) ≤ 0
        tmp.masked_fill_(m.upper, -torch.inf).exp_()  # mask s > t to −inf, then exponentiate
        out.addcmul_(tmp, (Cw[:, :, n, None] * B[:, None, :, n]).unsqueeze(1))  # · C_t[n]·B_s[n]
    return out.mul_(d.unsqueeze(2))  # · Δ_s


def alpha_ssd(dt: Tensor, A: Tensor, CB: Tensor, groups: Tensor, m: Masks) -> Tensor:
    """Mamba-2 α for a chunk of heads: dt [b, L, c], A [c], CB [b, G, T, L] (C_t·B_s per group, target
    rows of `m`), groups [c] (group of each head) -> α [b, c, T, L]."""
    a = (dt * A).transpose(1, 2)  # [b, c, L]   A_h·Δ_t ≤ 0
    out = segsum(a, m).masked_fill_(m.upper, -torch.inf).exp_()  # exp(A_h·(S_t − S_s)), 0 above
    if CB.shape[1] == 1:
        out.mul_(CB)
    else:
        out.mul_(CB.index_select(1, groups))
    return out.mul_(dt.transpose(1, 2).unsqueeze(2))  # · Δ_s


def add_D(alpha: Tensor, D: Tensor, m: Masks) -> Tensor:
    """α + diag(D) in place: alpha [b, c, T, L] (rows t0..t1 of `m`), D [c]."""
    alpha[..., m.t0 : m.t1].diagonal(dim1=-2, dim2=-1).add_(D.view(1, -1, 1))
    return alpha


def fold_block(alphaD: Tensor, sig: Tensor, w: Tensor, cbias: Tensor, rows: Tensor,
               with_bias: bool = True) -> tuple[Tensor, Tensor]:
    """Fold conv, activation and the row scaling into α + diag(D), channel by channel.

    alphaD [b, h, 1, T, L] (α + diag(D) for T target rows, shared by the p channels of a head; h =
    channels, p = 1 for Mamba-1); sig = σ(v) [b, h, p, L]; w [h, p, K] conv taps; cbias [h, p]; rows
    [b, h, p, T] (the row scaling of the T target rows)
    -> (matrix = diag(rows)·(α + diag(D))·diag(σ(v))·M  [b, h·p, T, L],  bias = diag(rows)·(α + diag(D))·σ(v)·b
    [b, h·p, T], zeros when not `with_bias`).  M[s, r] = w[K − 1 − (s − r)] for 0 ≤ s − r < K (the
    causal depthwise conv of scan.causal_conv1d), so (X·M)[t, r] = Σ_k X[t, r + k]·w[K − 1 − k]: one
    shifted product per tap.
    """
    b, h, p, L = sig.shape
    T, K = alphaD.shape[-2], w.shape[-1]
    col = sig.unsqueeze(-1) * w[None, :, :, None, :]  # [b, h, p, L, K]  σ(v_s)·w_j
    out = torch.mul(alphaD, col[..., K - 1].unsqueeze(-2), out=alphaD.new_empty(b, h, p, T, L))  # tap k = 0 (contiguous)
    for k in range(1, min(K, L)):  # over conv taps, not positions
        out[..., : L - k].addcmul_(alphaD[..., k:], col[..., k:, K - 1 - k].unsqueeze(-2))
    out.mul_(rows.unsqueeze(-1))
    if with_bias:
        bias = torch.einsum("bhts,bhps->bhpt", alphaD[:, :, 0], sig * cbias.view(1, h, p, 1)) * rows
    else:
        bias = rows.new_zeros(b, h, p, T)
    return out.view(b, h * p, T, L), bias.reshape(b, h * p, T)


def fold_block_mean(alphaD: Tensor, sig: Tensor, w: Tensor, cbias: Tensor, rows: Tensor,
                    with_bias: bool = True) -> tuple[Tensor, Tensor]:
    """Σ over the p channels of each head, and over heads, of `fold_block`'s maps, without
    materialising a map per channel: Σ_p rows_p[t]·σ_p[s]·w_p[j] is a rank-p matrix product
    Q_j[t, s], so Σ_p matrix_p[t, r] = Σ_k (α + D)[t, r + k]·Q_{K−1−k}[t, r + k].

    Same arguments as `fold_block` -> (matrix summed over channels [b, T, L], bias summed [b, T]).
    """
    b, h, p, L = sig.shape
    K = w.shape[-1]
    A = alphaD[:, :, 0]  # [b, h, T, L]
    rw = rows.unsqueeze(2) * w.permute(0, 2, 1).unsqueeze(0).unsqueeze(-1)  # [b, h, K, p, T]  rows_p[t]·w_p[j]
    Q = rw.transpose(-1, -2) @ sig.unsqueeze(2)  # [b, h, K, T, L]  Σ_p rows_p[t]·w_p[j]·σ_p[s]
    out = torch.einsum("bhts,bhts->bts", A, Q[:, :, K - 1])
    for k in range(1, min(K, L)):
        out[..., : L - k] += torch.einsum("bhts,bhts->bts", A[..., k:], Q[:, :, K - 1 - k, :, k:])
    if not with_bias:
        return out, out.new_zeros(out.shape[:-1])
    Qb = rows.transpose(-1, -2) @ (sig * cbias.unsqueeze(-1))  # [b, h, T, L]  Σ_p rows_p[t]·σ_p[s]·b_p
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


def default_chunk(b: int, cells: int) -> int:
    """Channels per step so that a [b, chunk, T, L] work buffer has about 2^26 elements (cells = T·L)."""
    return max(1, CHUNK_ELEMENTS // max(1, b * cells))


def conv_params(conv1d: nn.Conv1d, E: int, f: torch.dtype, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Taps [E, K] and bias [E] of channels offset..offset+E of a depthwise conv (zeros without bias)."""
    w = conv1d.weight.detach()[offset : offset + E, 0, :].to(f)
    b = (conv1d.bias.detach()[offset : offset + E].to(f) if conv1d.bias is not None
         else torch.zeros(E, dtype=f, device=w.device))
    return w, b


def prefix(values, n: int):
    """The first n positions of hook values ([batch, pos, ...] tensors; anything else as is). The maps
    are causal, so rows t < n of a map computed from the prefix are the full map's rows, cut to the
    first n columns (the others are 0)."""
    if isinstance(values, torch.Tensor):
        return values[:, :n] if values.ndim >= 2 else values
    return {k: prefix(v, n) for k, v in values.items()}


def _window(L: int, opts: MapOptions | None, device) -> tuple[Masks, MapOptions]:
    opts = opts or MapOptions()
    t0, t1 = opts.window(L)
    return masks(L, device, t0, t1), opts


def _result_t0(opts: MapOptions) -> Optional[int]:
    return None if opts.rows is None else opts.rows[0]


# -- whole maps, called by the mixers -----------------------------------------------------------
def s6_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, reduce, chunk: int | None,
           opts: MapOptions | None = None, D: Tensor | None = None) -> Tensor:
    """Per-channel S6 maps: dt [b, L, E], A [E, N], B, C [b, L, N] -> [b, E, T, L] (or reduced [b, T, L]);
    T = L unless opts.rows is a window; with D [E] given, α + diag(D)."""
    b, L, E = dt.shape
    m, opts = _window(L, opts, dt.device)
    step = chunk or default_chunk(b, m.upper.numel())
    acc = Accumulator(reduce, E)
    for c0 in range(0, E, step):
        c1 = min(E, c0 + step)
        a = alpha_s6(dt[..., c0:c1], A[c0:c1], B, C, m)
        if D is not None:
            add_D(a, D[c0:c1], m)
        acc.add(a)
    return acc.result()


def s6_block_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, conv_out: Tensor, rows: Tensor,
                 conv1d: nn.Conv1d, reduce, chunk: int | None, opts: MapOptions | None = None) -> ImplicitAttention:
    """The whole Mamba-1 mixer up to the gate: dt [b, L, E], A [E, N], B, C [b, L, N], D [E], conv_out
    (v, before SiLU) [b, L, E], rows (the row scaling, e.g. SiLU(z)) [b, L, E]."""
    b, L, E = dt.shape
    f = dt.dtype
    m, opts = _window(L, opts, dt.device)
    step = chunk or default_chunk(b, m.upper.numel())
    sig = torch.sigmoid(conv_out).transpose(1, 2).contiguous()  # σ(v) [b, E, L]
    rows = rows[:, m.t0 : m.t1].transpose(1, 2)  # [b, E, T]
    wconv, cbias = conv_params(conv1d, E, f)
    with_D, with_bias = opts.with_D("block"), opts.include_bias
    mat, bias = Accumulator(reduce, E), Accumulator(reduce, E)
    for c0 in range(0, E, step):
        c1 = min(E, c0 + step)
        aD = alpha_s6(dt[..., c0:c1], A[c0:c1], B, C, m)  # [b, c, T, L]
        if with_D:
            add_D(aD, D[c0:c1], m)  # α + diag(D)
        mm, bb = fold_block(aD.unsqueeze(2), sig[:, c0:c1, None], wconv[c0:c1, None], cbias[c0:c1, None],
                            rows[:, c0:c1, None], with_bias)  # every channel its own "head" of one channel
        del aD
        mat.add(mm)
        bias.add(bb)
    return ImplicitAttention(mat.result(), bias.result(), reduce, _result_t0(opts))


def _ssd_parts(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, m: Masks):
    H, G = A.shape[0], B.shape[2]
    groups = torch.arange(H, device=dt.device) // (H // G)  # head h reads group h // (H / G)
    CB = torch.einsum("btgn,bsgn->bgts", C[:, m.t0 : m.t1], B)  # [b, G, T, L]
    return groups, CB


def ssd_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, reduce, chunk: int | None,
            opts: MapOptions | None = None, D: Tensor | None = None) -> Tensor:
    """Per-head SSD maps: dt [b, L, H], A [H], B, C [b, L, G, N] -> [b, H, T, L] (or reduced [b, T, L]);
    with D [H] given, α + diag(D)."""
    b, L, H = dt.shape
    m, opts = _window(L, opts, dt.device)
    step = chunk or default_chunk(b, m.upper.numel())
    groups, CB = _ssd_parts(dt, A, B, C, m)
    acc = Accumulator(reduce, H)
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        a = alpha_ssd(dt[..., h0:h1], A[h0:h1], CB, groups[h0:h1], m)
        if D is not None:
            add_D(a, D[h0:h1], m)
        acc.add(a)
    return acc.result()


def ssd_block_map(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, conv_out: Tensor, rows: Tensor,
                  conv1d: nn.Conv1d, head_dim: int, reduce, chunk: int | None,
                  opts: MapOptions | None = None) -> ImplicitAttention:
    """The whole Mamba-2 mixer up to its gated norm, per channel (channel e in head e // P):
    dt [b, L, H], A, D [H], B, C [b, L, G, N], conv_out (the x part of the conv output) [b, L, E],
    rows (w ⊙ SiLU(z_t) / rms_group(t)) [b, L, E]."""
    b, L, H = dt.shape
    E, P = conv_out.shape[-1], head_dim
    f = dt.dtype
    m, opts = _window(L, opts, dt.device)
    step = chunk or default_chunk(b, m.upper.numel())
    T = m.upper.shape[0]
    groups, CB = _ssd_parts(dt, A, B, C, m)
    sig = torch.sigmoid(conv_out).transpose(1, 2).reshape(b, H, P, L)  # σ(v), channel e = (head e // P, e % P)
    rows = rows[:, m.t0 : m.t1].transpose(1, 2).reshape(b, H, P, T)
    wconv, cbias = conv_params(conv1d, E, f)
    wconv, cbias = wconv.view(H, P, -1), cbias.view(H, P)
    with_D, with_bias = opts.with_D("block"), opts.include_bias
    mat, bias = Accumulator(reduce, E), Accumulator(reduce, E)
    # whole heads per step, or `sub` channels of one head; the mean needs no per-channel maps, so whole heads
    heads_per, sub = max(1, step // P), (P if reduce == "mean" else min(step, P))
    for h0 in range(0, H, heads_per):
        h1 = min(H, h0 + heads_per)
        aD = alpha_ssd(dt[..., h0:h1], A[h0:h1], CB, groups[h0:h1], m)  # [b, hs, T, L]
        if with_D:
            add_D(aD, D[h0:h1], m)  # α + diag(D)
        aD = aD.unsqueeze(2)  # [b, hs, 1, T, L]
        for p0 in range(0, P, sub):
            p1 = min(P, p0 + sub)
            parts = (aD, sig[:, h0:h1, p0:p1], wconv[h0:h1, p0:p1], cbias[h0:h1, p0:p1], rows[:, h0:h1, p0:p1])
            if reduce == "mean":  # sum over channels by matrix products (no per-channel maps)
                mm, bb = fold_block_mean(*parts, with_bias)
                mat.add_sum(mm)
                bias.add_sum(bb)
            else:
                mm, bb = fold_block(*parts, with_bias)
                mat.add(mm)
                bias.add(bb)
    return ImplicitAttention(mat.result(), bias.result(), reduce, _result_t0(opts))


# -- the papers' drawing conventions ------------------------------------------------------------
def minmax_abs(maps: Tensor) -> Tensor:
    """Zimerman et al.'s normalisation for drawing: |·| then min-max over each map's last two dims
    (their `normalize_attn_mat(attn_mat.abs())`), so each map spans [0, 1]; a constant map gives 0."""
    a = maps.abs()
    lo = a.amin(dim=(-2, -1), keepdim=True)
    span = a.amax(dim=(-2, -1), keepdim=True) - lo
    return (a - lo) / torch.where(span > 0, span, torch.ones_like(span))
