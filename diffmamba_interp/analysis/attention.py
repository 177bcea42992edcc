"""Implicit attention of (Diff-)Mamba layers: the selective scan, or the whole mixer, written as a
data-controlled causal matrix over positions (SPEC §3; Ali, Zimerman & Wolf 2024, "The Hidden
Attention of Mamba Models"; Zimerman, Ali & Wolf 2024, "Explaining Modern Gated-Linear RNNs via a
Unified Implicit Attention Formulation").

Dimension letters as in config.py: b batch, L = pos, E channels (d_inner), H heads, P head_dim,
N state, G groups, K conv kernel; t is the target (row) position, s the source (column) position.

Two kinds of map:

- ``kind="s6"`` — the scan operator α, returned as a tensor.
  Mamba-1, per channel c:  α_c[t,s] = Σ_n C_t[n]·exp(A[c,n]·(S_t[c] − S_s[c]))·Δ_s[c]·B_s[n]
  -> [b, E, L, L], with  y_t[c] − D[c]·u_t[c] = Σ_s α_c[t,s]·u_s[c]  (u = hook_ssm_in, y = hook_ssm_out).
  Mamba-2, per head h:  α_h[t,s] = (C_t·B_s)_{group(h)}·exp(A_h·(S_t − S_s))·Δ_s[h]
  -> [b, H, L, L], with  y_t[h,p] − D_h·x_t[h,p] = Σ_s α_h[t,s]·x_s[h,p].
- ``kind="block"`` — the whole mixer up to out_proj as a map of the in_proj x path plus a bias,
  returned as an :class:`ImplicitAttention` (``matrix`` [b, E, L, L], ``bias`` [b, E, L]), with
  ``reconstruct(x)`` = Σ_s matrix[c,t,s]·x_s[c] + bias[c,t]:
  Mamba-1:  𝒜 = diag(SiLU(z))·(α + diag(D))·diag(σ(v))·M,  bias = diag(SiLU(z))·(α + diag(D))·σ(v)·b;
            reconstruct(hook_x) == hook_gated.
  Mamba-2:  𝒜 = diag(w ⊙ SiLU(z_t) / rms_group(t))·(α + diag(D))·diag(σ(v))·M, per channel
            (σ(v), M and z differ between the channels of a head); reconstruct(x part of hook_xBC)
            == norm.hook_normalized.
  Diff-S6:  per branch k, 𝒜_k = diag(SiLU(z) ⊙ (1 − λ_init)·w_subln·scale_t)·(α_k + diag(D_k))·diag(σ(v))·M,
            with scale_t the subln's 1/rms (a row scaling, read from the cache); the branches share
            channels and (𝒜₁ − λ𝒜₂)·x + (bias₁ − λ·bias₂) == hook_gated exactly
            (``differential_attention(..., kind="block", reduce=None)``).
  Here v = M x + b is the causal depthwise conv (M an L×L banded matrix per channel, b its bias)
  and u = SiLU(v) = σ(v) ⊙ v; B and C (Mamba-2: also conv outputs) are held at their observed
  values, which is what makes the map data-controlled rather than linear in x.

With ``reduce`` ("mean" or "absmean" over channels/heads) the maps are accumulated ``chunk``
channels (heads for Mamba-2 "s6") at a time, so memory is O(b·chunk·L²) rather than O(b·E·L²);
the result is [b, L, L] (and the block bias [b, L]).

Numerics: float32 (float64 for a float64 model), log-space decays from a segment sum of Δ (or A·Δ),
positions s > t masked to −inf before the exponential, so nothing overflows for any Δ·|A|. The
upstream reference code loops over t and s and multiplies decays (O(L³), fp16);
benchmarks/attention.py compares against such a loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..errors import DiffMambaError
from ..lambdas import lambda_init
from ..mixers import DiffS6Mixer, Mamba1Mixer, Mamba2Mixer
from ..scan import compute_dtype

Tensor = torch.Tensor

KINDS = ("s6", "block")
REDUCES = (None, "mean", "absmean")
# default chunk: about this many elements per [b, chunk, L, L] work buffer (256 MiB in float32)
_CHUNK_ELEMENTS = 1 << 26


# -- result of kind="block" -------------------------------------------------------------------
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


# -- which mixer / core a (layer, branch) names ------------------------------------------------
@dataclass
class _Target:
    family: str  # "mamba1" (S6) or "mamba2" (SSD)
    front: str  # hook prefix of the module with in_proj/conv/gate ("blocks.3.mixer", "blocks.3.mixer_1")
    core: str  # hook prefix of the module with hook_dt/B/C/ssm_out ("blocks.3.mixer.ssm_2" for Diff-S6)
    front_mod: nn.Module
    core_mod: nn.Module
    diffs6: bool  # the subln of a Diff-S6 mixer sits between scan and gate
    layer: int

    def hooks(self, kind: str) -> list[str]:
        names = [f"{self.core}.hook_dt", f"{self.core}.hook_B", f"{self.core}.hook_C"]
        if kind == "block":
            names += [f"{self.front}.hook_conv", f"{self.front}.hook_gate"]
            if self.family == "mamba2":
                names += [f"{self.front}.hook_xBC", f"{self.front}.norm.hook_scale"]
            else:
                names += [f"{self.front}.hook_x"]
            if self.diffs6:
                names += [f"{self.front}.subln.hook_scale"]
        return names


def _blocks(model) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise DiffMambaError(f"expected a HookedMamba (with .blocks), got {type(model).__name__}")
    return blocks


def _check_layer(model, layer) -> nn.Module:
    blocks = _blocks(model)
    n = len(blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise DiffMambaError(f"layer {layer!r} is out of range: valid block indices are 0..{n - 1}")
    return blocks[layer]


def _is_differential(block: nn.Module) -> bool:
    return hasattr(block, "mixer_1") or isinstance(getattr(block, "mixer", None), DiffS6Mixer)


def _resolve(model, layer, branch) -> _Target:
    """The mixer (and S6 core) that `layer`/`branch` name, with clear errors for a wrong branch."""
    block = _check_layer(model, layer)
    mixer = getattr(block, "mixer", None)
    if hasattr(block, "mixer_1"):  # Diff-Mamba-1/2 block: two whole mixers
        if branch not in (1, 2):
            raise DiffMambaError(
                f"layer {layer} is a differential block (mixer_1, mixer_2): pass branch=1 or branch=2, got {branch!r}"
            )
        mod = getattr(block, f"mixer_{branch}")
        family = "mamba2" if isinstance(mod, Mamba2Mixer) else "mamba1"
        name = f"blocks.{layer}.mixer_{branch}"
        return _Target(family, name, name, mod, mod, False, layer)
    if isinstance(mixer, DiffS6Mixer):  # Diff-S6: one front, two S6 cores
        if branch not in (1, 2):
            raise DiffMambaError(
                f"layer {layer} is a Diff-S6 layer (ssm_1, ssm_2): pass branch=1 or branch=2, got {branch!r}"
            )
        name = f"blocks.{layer}.mixer"
        return _Target("mamba1", name, f"{name}.ssm_{branch}", mixer, getattr(mixer, f"ssm_{branch}"), True, layer)
    if isinstance(mixer, (Mamba1Mixer, Mamba2Mixer)):
        if branch is not None:
            raise DiffMambaError(f"layer {layer} is a plain (non-differential) layer: it has no branch {branch!r}; pass branch=None")
        family = "mamba2" if isinstance(mixer, Mamba2Mixer) else "mamba1"
        name = f"blocks.{layer}.mixer"
        return _Target(family, name, name, mixer, mixer, False, layer)
    raise DiffMambaError(f"layer {layer}: unsupported mixer type {type(mixer).__name__}")


def _check_args(kind, reduce, chunk) -> None:
    if kind not in KINDS:
        raise DiffMambaError(f"unknown kind {kind!r}; expected 's6' or 'block'")
    if reduce not in REDUCES:
        raise DiffMambaError(f"unknown reduce {reduce!r}; expected None, 'mean' or 'absmean'")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise DiffMambaError(f"chunk must be a positive number of channels/heads or None, got {chunk!r}")


def _run(model, input_ids: Tensor, names: list[str]) -> dict[str, Tensor]:
    """One forward, caching only `names` (the hooks of one block); a 1-D [pos] input is batch 1."""
    if isinstance(input_ids, Tensor) and input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    model.check_input_ids(input_ids)
    with torch.no_grad():
        _, cache = model.run_with_cache(input_ids.to(model.device), names_filter=list(dict.fromkeys(names)), return_type=None)
    return {n: cache[n] for n in names}


# -- the kernels: α for a chunk of channels / heads --------------------------------------------
class _Masks(NamedTuple):
    """Boolean [L(t), L(s)] masks, built once per call."""

    not_strict: Tensor  # s ≥ t
    upper: Tensor  # s > t: masked to −inf before every exponential


def _masks(L: int, device) -> _Masks:
    ones = torch.ones(L, L, dtype=torch.bool, device=device)
    return _Masks(torch.triu(ones), torch.triu(ones, diagonal=1))


def _segsum(x: Tensor, masks: _Masks) -> Tensor:
    """x [..., L] -> [..., L(t), L(s)], out[t, s] = Σ_{s<k≤t} x[k] for s < t, 0 elsewhere (not masked).

    A cumulative sum down each column of a masked copy, as in ssd_minimal's segsum: no difference
    of two large prefix sums, so short spans stay accurate however long the sequence.
    """
    L = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, L).masked_fill(masks.not_strict, 0)  # [..., t, s] = x[t] for s < t
    return torch.cumsum(xx, dim=-2)


def _alpha_s6(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, masks: _Masks) -> Tensor:
    """Mamba-1 α for a chunk of channels.

    dt [b, L, c] (Δ after softplus), A [c, N], B, C [b, L, N] -> α [b, c, L, L].
    """
    d = dt.transpose(1, 2)  # [b, c, L]
    seg = _segsum(d, masks)  # [b, c, t, s]  S_t − S_s for s < t, 0 on/above the diagonal
    out = torch.zeros_like(seg)
    tmp = torch.empty_like(seg)
    for n in range(A.shape[1]):  # over the state dimension (N), not over positions
        torch.mul(seg, A[:, n].view(1, -1, 1, 1), out=tmp)  # A[c,n]·(S_t − S_s) ≤ 0
        tmp.masked_fill_(masks.upper, -torch.inf).exp_()  # mask s > t to −inf, then exponentiate
        out.addcmul_(tmp, (C[:, :, n, None] * B[:, None, :, n]).unsqueeze(1))  # · C_t[n]·B_s[n]
    return out.mul_(d.unsqueeze(2))  # · Δ_s


def _alpha_ssd(dt: Tensor, A: Tensor, CB: Tensor, groups: Tensor, masks: _Masks) -> Tensor:
    """Mamba-2 α for a chunk of heads.

    dt [b, L, c], A [c], CB [b, G, L, L] (C_t·B_s per group), groups [c] (group of each head)
    -> α [b, c, L, L].
    """
    a = (dt * A).transpose(1, 2)  # [b, c, L]   A_h·Δ_t ≤ 0
    out = _segsum(a, masks).masked_fill_(masks.upper, -torch.inf).exp_()  # exp(A_h·(S_t − S_s)), 0 above
    if CB.shape[1] == 1:
        out.mul_(CB)
    else:
        out.mul_(CB.index_select(1, groups))
    return out.mul_(dt.transpose(1, 2).unsqueeze(2))  # · Δ_s


def _fold_block(alphaD: Tensor, sig: Tensor, w: Tensor, cbias: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
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


def _fold_block_mean(alphaD: Tensor, sig: Tensor, w: Tensor, cbias: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Σ over the p channels of each head, and over heads, of `_fold_block`'s maps, without
    materialising a map per channel: Σ_p rows_p[t]·σ_p[s]·w_p[j] is a rank-p matrix product
    Q_j[t, s], so Σ_p matrix_p[t, r] = Σ_k (α + D)[t, r + k]·Q_{K−1−k}[t, r + k].

    Same arguments as `_fold_block` -> (matrix summed over channels [b, L, L], bias summed [b, L]).
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


class _Acc:
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


def _default_chunk(b: int, L: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, b * L * L))


# -- putting it together for one target --------------------------------------------------------
def _compute(tg: _Target, cache: dict[str, Tensor], kind: str, reduce, chunk, f: torch.dtype):
    g = lambda name: cache[name].to(f)  # noqa: E731
    dt = g(f"{tg.core}.hook_dt")  # [b, L, E] or [b, L, H]
    b, L = dt.shape[:2]
    dev = dt.device
    masks = _masks(L, dev)
    A = -torch.exp(tg.core_mod.A_log.detach().to(compute_dtype(tg.core_mod.A_log.dtype))).to(f)  # as the mixers compute A
    D = tg.core_mod.D.detach().to(f)
    step = chunk or _default_chunk(b, L)
    B, C = g(f"{tg.core}.hook_B"), g(f"{tg.core}.hook_C")

    if tg.family == "mamba2":
        H, G = A.shape[0], B.shape[2]
        groups = torch.arange(H, device=dev) // (H // G)  # head h reads group h // (H / G)
        CB = torch.einsum("btgn,bsgn->bgts", C, B)  # [b, G, L, L]

        def alpha(h0: int, h1: int) -> Tensor:
            return _alpha_ssd(dt[..., h0:h1], A[h0:h1], CB, groups[h0:h1], masks)

        if kind == "s6":
            acc = _Acc(reduce, H)
            for h0 in range(0, H, step):
                acc.add(alpha(h0, min(H, h0 + step)))
            return acc.result()
        # block: per channel; channel e belongs to head e // P
        mixer = tg.front_mod
        E, P = mixer.d_inner, mixer.head_dim
        sig = torch.sigmoid(g(f"{tg.front}.hook_conv")[..., :E]).transpose(1, 2)  # σ(v) [b, E, L]
        scale = g(f"{tg.front}.norm.hook_scale")  # [b, L, Gn]  1/rms of each norm group
        scale_e = scale.repeat_interleave(E // scale.shape[-1], dim=-1)  # [b, L, E]
        rows = (mixer.norm.weight.detach().to(f) * scale_e * g(f"{tg.front}.hook_gate")).transpose(1, 2)  # [b, E, L]
        wconv, cbias = _conv_params(mixer.conv1d, E, f)  # [E, K], [E]
        sig, rows = sig.reshape(b, H, P, L), rows.reshape(b, H, P, L)  # channel e = (head e // P, e % P)
        wconv, cbias = wconv.view(H, P, -1), cbias.view(H, P)
        mat, bias = _Acc(reduce, E), _Acc(reduce, E)
        # whole heads per step, or `sub` channels of one head; the mean needs no per-channel maps, so whole heads
        heads_per, sub = max(1, step // P), (P if reduce == "mean" else min(step, P))
        for h0 in range(0, H, heads_per):
            h1 = min(H, h0 + heads_per)
            aD = alpha(h0, h1)  # [b, hs, L, L]
            aD.diagonal(dim1=-2, dim2=-1).add_(D[h0:h1].view(1, -1, 1))  # α + diag(D)
            aD = aD.unsqueeze(2)  # [b, hs, 1, L, L]
            for p0 in range(0, P, sub):
                p1 = min(P, p0 + sub)
                parts = (aD, sig[:, h0:h1, p0:p1], wconv[h0:h1, p0:p1], cbias[h0:h1, p0:p1], rows[:, h0:h1, p0:p1])
                if reduce == "mean":  # sum over channels by matrix products (no per-channel maps)
                    m, bb = _fold_block_mean(*parts)
                    mat.add_sum(m)
                    bias.add_sum(bb)
                else:
                    m, bb = _fold_block(*parts)
                    mat.add(m)
                    bias.add(bb)
        return ImplicitAttention(mat.result(), bias.result(), reduce)

    # Mamba-1 / Diff-S6
    E = A.shape[0]
    if kind == "s6":
        acc = _Acc(reduce, E)
        for c0 in range(0, E, step):
            c1 = min(E, c0 + step)
            acc.add(_alpha_s6(dt[..., c0:c1], A[c0:c1], B, C, masks))
        return acc.result()
    mixer = tg.front_mod
    sig = torch.sigmoid(g(f"{tg.front}.hook_conv")).transpose(1, 2)  # σ(v) [b, E, L]
    rows = g(f"{tg.front}.hook_gate")  # SiLU(z) [b, L, E]
    if tg.diffs6:  # y = (1 − λ_init)·w ⊙ subln_scale_t ⊙ (S6₁ − λ·S6₂): a row scaling per branch
        sub = mixer.subln
        rows = rows * (1 - lambda_init(tg.layer)) * sub.weight.detach().to(f) * g(f"{tg.front}.subln.hook_scale")
    rows = rows.transpose(1, 2)  # [b, E, L]
    wconv, cbias = _conv_params(mixer.conv1d, E, f)
    mat, bias = _Acc(reduce, E), _Acc(reduce, E)
    for c0 in range(0, E, step):
        c1 = min(E, c0 + step)
        aD = _alpha_s6(dt[..., c0:c1], A[c0:c1], B, C, masks)  # [b, c, L, L]
        aD.diagonal(dim1=-2, dim2=-1).add_(D[c0:c1].view(1, -1, 1))  # α + diag(D)
        m, bb = _fold_block(aD.unsqueeze(2), sig[:, c0:c1, None], wconv[c0:c1, None], cbias[c0:c1, None],
                            rows[:, c0:c1, None])  # every channel its own "head" of one channel
        del aD
        mat.add(m)
        bias.add(bb)
    return ImplicitAttention(mat.result(), bias.result(), reduce)


def _conv_params(conv1d: nn.Conv1d, E: int, f: torch.dtype) -> tuple[Tensor, Tensor]:
    """Taps [E, K] and bias [E] of the x channels of a depthwise conv (zeros if it has no bias)."""
    w = conv1d.weight.detach()[:E, 0, :].to(f)
    b = conv1d.bias.detach()[:E].to(f) if conv1d.bias is not None else torch.zeros(E, dtype=f, device=w.device)
    return w, b


# -- public API ---------------------------------------------------------------------------------
@torch.no_grad()
def implicit_attention(model, input_ids: Tensor, layer: int, branch: int | None = None, kind: str = "s6",
                       reduce: str | None = None, chunk: int | None = None) -> Tensor | ImplicitAttention:
    """The implicit attention of block `layer` on `input_ids` [batch, pos] (SPEC §3).

    layer:  block index i of ``blocks.{i}`` (0..n_layers − 1).
    branch: 1 or 2 for a differential layer (mixer_1/mixer_2 of a Diff-Mamba-1/2 block, ssm_1/ssm_2
            of a Diff-S6 layer); None for a plain layer.
    kind:   "s6" -> the scan operator α as a tensor: [batch, E, pos, pos] (Mamba-1, per channel) or
            [batch, H, pos, pos] (Mamba-2, per head).
            "block" -> an :class:`ImplicitAttention` (matrix [batch, E, pos, pos], bias [batch, E, pos])
            whose ``reconstruct(x)`` gives hook_gated (Mamba-1), norm.hook_normalized (Mamba-2), or
            for Diff-S6 this branch's share of hook_gated (see the module docstring).
    reduce: None, "mean" or "absmean" over channels/heads -> [batch, pos, pos] (block bias [batch, pos]).
    chunk:  channels (heads for Mamba-2 "s6") per step; None picks one so that each work buffer is
            about 2^26 elements (256 MiB in float32). Memory is O(batch·chunk·pos²) plus the output.
            (Mamba-2 "block" with reduce="mean" works a whole head at a time, summing its channels by
            matrix products, in O(batch·max(1, chunk / head_dim)·K·pos²).)

    Row t, column s: how much position s feeds position t; exactly 0 above the diagonal. Computed
    in float32 (float64 for a float64 model) from one forward that caches only this block's hooks.
    """
    _check_args(kind, reduce, chunk)
    tg = _resolve(model, layer, branch)
    cache = _run(model, input_ids, tg.hooks(kind))
    return _compute(tg, cache, kind, reduce, chunk, compute_dtype(model.dtype))


@torch.no_grad()
def differential_attention(model, input_ids: Tensor, layer: int, kind: str = "s6", reduce: str | None = "mean",
                           chunk: int | None = None) -> Tensor | ImplicitAttention:
    """map₁ − λ·map₂ for a differential layer, λ the block's λ as used in the forward (hook_lambda).

    Diff-Mamba-1/2 branches have their own projections, so channels are not shared: each branch is
    first aggregated over its channels/heads with `reduce` ("mean" or "absmean"), then differenced
    (SPEC §3) -> [batch, pos, pos]. Diff-S6 branches share channels, so reduce=None is allowed there
    and gives the per-channel difference [batch, E, pos, pos]; with kind="block" that difference
    reconstructs the mixer's hook_gated exactly. Returns a tensor for kind="s6" and an
    :class:`ImplicitAttention` (matrix and bias differenced) for kind="block".
    """
    _check_args(kind, reduce, chunk)
    block = _check_layer(model, layer)
    if not _is_differential(block):
        raise DiffMambaError(
            f"layer {layer} is not a differential layer (arch {model.cfg.arch}); "
            f"differential layers: {list(model.cfg.diff_layer_indices) or 'none'}"
        )
    t1, t2 = _resolve(model, layer, 1), _resolve(model, layer, 2)
    if reduce is None and not t1.diffs6:
        raise DiffMambaError(
            "reduce=None is only defined for Diff-S6 layers: the two mixers of a Diff-Mamba block do not share "
            "channels, so aggregate each branch first (reduce='mean' or 'absmean')"
        )
    lam_name = f"blocks.{layer}.mixer.hook_lambda" if t1.diffs6 else f"blocks.{layer}.hook_lambda"
    cache = _run(model, input_ids, t1.hooks(kind) + t2.hooks(kind) + [lam_name])
    f = compute_dtype(model.dtype)
    lam = cache[lam_name].to(f)
    m1 = _compute(t1, cache, kind, reduce, chunk, f)
    m2 = _compute(t2, cache, kind, reduce, chunk, f)
    if kind == "s6":
        return m1 - lam * m2
    return ImplicitAttention(m1.matrix - lam * m2.matrix, m1.bias - lam * m2.bias, reduce)
