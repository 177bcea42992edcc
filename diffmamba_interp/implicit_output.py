"""The implicit attention of a whole block in its d-dimensional output space (kind "output"): the
operator that the block applies, which for a differential block is where Diff-Mamba subtracts.

For target t and source s, the block's mixer output (`blocks.i.hook_mixer_out`) is

    out_t = Σ_s O[t,s]·h_s + bias_t,     O[t,s] = ρ_t · Σ_k c_k · W_out,k · diag(𝒜_k[:, t, s]) · W_in,k

with h the block's normed input (`blocks.i.norm.hook_normalized`, [b, L, d]) and k over the branches
(one for a plain block): 𝒜_k the branch's per-channel whole-block map (`implicit.ImplicitAttention`:
conv, SiLU, D and its own row scaling G_k[t], the gate and for Mamba-2 the gated-norm scale), W_in,k
the in_proj rows of its x path [E_k, d], W_out,k its out_proj [d, E_k] with any d-space gain folded
in ((1 − λ_init)·w_subln for a differential block), c_k its coefficient (1 and −λ) and ρ_t a scalar
per target (the subln's 1/rms; 1 without). So for a Diff-Mamba block
O[t,s] = (1 − λ_init)·diag(w_subln)·ρ_t·(W_out,1·G₁[t]·𝒜₁[t,s]·W_in,1 − λ·W_out,2·G₂[t]·𝒜₂[t,s]·W_in,2).
The bias terms (conv, in_proj and out_proj biases) are
bias_t = ρ_t·Σ_k c_k·(W_out,k·(cbias_k[t] + Σ_s 𝒜_k[:, t, s] ⊙ b_in,k) + b_out,k) + shared bias.

Everything is computed a block of target rows at a time from each branch's per-channel maps
(O(b·E·T·L) memory for T rows), never as [L, L, d, d]:
- `reconstruct(h)` / `apply(h)` / `bias()`: the output, the operator part, the bias part;
- `frobenius()`: ‖O[t,s]‖_F per (t, s), as ‖Z·a[t,s]‖₂ with a the branches' stacked channel maps and
  ZᵀZ = (PᵀP) ⊙ (W Wᵀ) (P = [c_k·W_out,k], W = [W_in,k] stacked; Z a Cholesky factor, computed once
  per layer's weights), a sum of squares, so never negative and accurate where the branches cancel;
- `project(u, h)`: uᵀ·O[t,s]·h_s, how much source s moves the output along u (e.g. the answer token's
  unembedding direction through norm_f), with `project_bias(u)` its Σ_s-free rest;
- `dense()`: O itself [b, T, L, d, d], for small models only;
- `branch(k)`: branch k's term alone (Σ_k terms + shared bias = the whole).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import DiffMambaError
from .implicit import CHUNK_ELEMENTS, ImplicitAttention

Tensor = torch.Tensor

# `dense()` refuses to build more elements than this (2^26: 256 MiB in float32)
DENSE_LIMIT = 1 << 26
# the Frobenius factors Z depend on the weights only: kept by content, up to this many bytes
FACTOR_CACHE_BYTES = 1 << 29


class _FactorCache:
    """Z by the bytes of the weights it comes from (least recently used dropped first), so the same
    layer's eigendecomposition is done once however many prompts are read."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.items, self.size = max_bytes, OrderedDict(), 0

    @staticmethod
    def key(tensors: Sequence[Tensor]) -> str:
        h = hashlib.blake2b(digest_size=20)
        for t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def get(self, key: str) -> Optional[Tensor]:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: str, value: Tensor) -> None:
        n = value.numel() * value.element_size()
        if n > self.max_bytes:
            return
        self.items[key] = value
        self.size += n
        while self.size > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.size -= old.numel() * old.element_size()


FACTORS = _FactorCache(FACTOR_CACHE_BYTES)


@dataclass
class OutputBranch:
    """One branch's term c·diag(ρ_t)·W_out·diag(𝒜[:, t, s])·W_in (+ its biases).

    maps: (t0, t1) -> the branch's per-channel whole-block map for target rows t0..t1−1
          (`ImplicitAttention`, matrix [b, E, T, S], conv-bias term [b, E, T]) over the first S ≥ t1
          sources (S < L: the columns from S on are 0, as in any causal map).
    """

    maps: Callable[[int, int], ImplicitAttention]
    w_in: Tensor  # [E, d]
    w_out: Tensor  # [d, E], any d-space gain folded in
    coef: Tensor  # []  1 or −λ
    b_in: Optional[Tensor] = None  # [E]  in_proj bias of the x path
    b_out: Optional[Tensor] = None  # [d]  out_proj bias (gain folded in)

    def scaled(self, gain: Tensor, coef: Tensor) -> "OutputBranch":
        """This branch behind a d-space gain (W_out -> diag(gain)·W_out) with coefficient `coef`."""
        b_out = None if self.b_out is None else gain * self.b_out
        return dataclasses.replace(self, w_out=gain[:, None] * self.w_out, b_out=b_out, coef=coef * self.coef)


@dataclass
class OutputSummaries:
    """Reductions of an `OutputAttention` over its rows, from one pass over the maps.

    norm: ‖O[t,s]‖_F [b, T, L]; norm_branches: the same per branch term; contrib: uᵀ·O[t,s]·h_s
    [b, T, L] (with contrib_branches per term) and contrib_bias: uᵀ·bias_t [b, T] when a direction
    and an input were given; None otherwise.
    """

    norm: Optional[Tensor] = None
    norm_branches: Optional[list[Tensor]] = None
    contrib: Optional[Tensor] = None
    contrib_branches: Optional[list[Tensor]] = None
    contrib_bias: Optional[Tensor] = None


class OutputAttention:
    """The output-space implicit attention of one block (module docstring), over target rows `rows`."""

    def __init__(self, branches: Sequence[OutputBranch], *, names: Sequence[str], n_pos: int, batch: int,
                 row_scale: Optional[Tensor] = None, shared_bias: Optional[Tensor] = None,
                 rows: Optional[tuple[int, int]] = None, chunk: Optional[int] = None):
        if len(branches) != len(names) or not branches:
            raise DiffMambaError("OutputAttention needs one name per branch and at least one branch")
        self.branches, self.names = list(branches), tuple(names)
        self.n_pos, self.batch = n_pos, batch
        self.row_scale, self.shared_bias = row_scale, shared_bias  # [b, L] or None, [d] or None
        t0, t1 = rows if rows is not None else (0, n_pos)
        if not 0 <= t0 < t1 <= n_pos:
            raise DiffMambaError(f"rows ({t0}, {t1}) are not a window of 0..{n_pos}")
        self.t0, self.t1, self.chunk = t0, t1, chunk
        self._factors: dict = {}

    # -- shape and parts ---------------------------------------------------------------------------
    @property
    def rows(self) -> range:
        return range(self.t0, self.t1)

    @property
    def d_model(self) -> int:
        return self.branches[0].w_out.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.branches[0].w_in.dtype

    def branch(self, k: int) -> "OutputAttention":
        """Branch k's term alone (1-based), with the block's row scaling, without the shared bias."""
        if not 1 <= k <= len(self.branches):
            raise DiffMambaError(f"branch {k!r} out of range: this operator has {len(self.branches)} branch(es)")
        return self._like(branches=[self.branches[k - 1]], names=[self.names[k - 1]], shared_bias=None)

    def with_rows(self, t0: int, t1: int) -> "OutputAttention":
        return self._like(rows=(t0, t1))

    def _like(self, **kw) -> "OutputAttention":
        args = dict(branches=self.branches, names=self.names, n_pos=self.n_pos, batch=self.batch,
                    row_scale=self.row_scale, shared_bias=self.shared_bias, rows=(self.t0, self.t1), chunk=self.chunk)
        args.update(kw)
        return OutputAttention(args.pop("branches"), **args)

    def _steps(self):
        """(r0, r1, [per-branch ImplicitAttention]) over blocks of target rows."""
        E = sum(br.w_in.shape[0] for br in self.branches)
        step = self.chunk or max(1, CHUNK_ELEMENTS // max(1, self.batch * E * self.n_pos))
        for r0 in range(self.t0, self.t1, step):
            r1 = min(self.t1, r0 + step)
            yield r0, r1, [br.maps(r0, r1) for br in self.branches]

    def _scale(self, r0: int, r1: int) -> Optional[Tensor]:
        return None if self.row_scale is None else self.row_scale[:, r0:r1]  # [b, T]

    def _check_h(self, h: Tensor) -> Tensor:
        want = (self.batch, self.n_pos, self.d_model)
        if tuple(h.shape) != want:
            raise DiffMambaError(f"h must be the block's normed input of shape {want} [batch, pos, d], got {tuple(h.shape)}")
        return h.to(self.dtype)

    # -- the output, exactly -------------------------------------------------------------------------
    def _xs(self, h: Tensor) -> list[Tensor]:
        h = self._check_h(h)
        return [h @ br.w_in.T for br in self.branches]  # x_k = W_in,k·h (no in_proj bias) [b, L, E_k]

    def _op_rows(self, maps, xs, r0: int, r1: int) -> Tensor:
        """Σ_s O[t,s]·h_s for the rows of `maps` (without ρ_t) [b, T, d]."""
        return sum(br.coef * (torch.einsum("bets,bse->bte", m.matrix, x[:, : m.matrix.shape[-1]]) @ br.w_out.T)
                   for br, m, x in zip(self.branches, maps, xs))

    def _pad(self, x: Tensor) -> Tensor:
        """[..., S] -> [..., L] with zeros for the sources S.. (causal maps of a prefix)."""
        return x if x.shape[-1] == self.n_pos else torch.nn.functional.pad(x, (0, self.n_pos - x.shape[-1]))

    def _bias_rows(self, maps) -> Tensor:
        """The branches' bias terms for the rows of `maps` (without ρ_t and the shared bias) [b, T, d]."""
        y = 0
        for br, m in zip(self.branches, maps):
            g = m.bias.transpose(1, 2)  # conv-bias term [b, T, E]
            if br.b_in is not None:
                g = g + m.matrix.sum(-1).transpose(1, 2) * br.b_in  # Σ_s 𝒜[:, t, s] ⊙ b_in (0 beyond the prefix)
            yk = g @ br.w_out.T
            y = y + br.coef * (yk if br.b_out is None else yk + br.b_out)
        return y

    def _rows_scaled(self, x: Tensor, r0: int, r1: int) -> Tensor:
        scale = self._scale(r0, r1)
        return x if scale is None else x * scale.unsqueeze(-1)

    def _out_rows(self, h: Optional[Tensor], with_bias: bool) -> Tensor:
        xs = None if h is None else self._xs(h)
        out = []
        for r0, r1, maps in self._steps():
            y = self._op_rows(maps, xs, r0, r1) if xs is not None else 0
            if with_bias:
                y = y + self._bias_rows(maps)
            out.append(self._rows_scaled(y, r0, r1))
        y = torch.cat(out, dim=1)
        if with_bias and self.shared_bias is not None:
            y = y + self.shared_bias
        return y

    def reconstruct(self, h: Tensor) -> Tensor:
        """h [b, L, d] (the block's normed input) -> Σ_s O[t,s]·h_s + bias_t [b, T, d]: the block's
        `hook_mixer_out` at the rows' targets (exactly, up to rounding)."""
        return self._out_rows(h, with_bias=True)

    def apply(self, h: Tensor) -> Tensor:
        """The operator part Σ_s O[t,s]·h_s [b, T, d] (no bias terms)."""
        return self._out_rows(h, with_bias=False)

    def bias(self) -> Tensor:
        """The bias terms bias_t [b, T, d]: the output for h = 0 with every map frozen."""
        return self._out_rows(None, with_bias=True)

    def dense(self) -> Tensor:
        """O[t,s] as a tensor [b, T, L, d, d] (row t of the window, source s): small models only."""
        T, L, d = self.t1 - self.t0, self.n_pos, self.d_model
        n = self.batch * T * L * d * d
        if n > DENSE_LIMIT:
            raise DiffMambaError(
                f"the dense output-space operator would have {n:,} elements (batch {self.batch}, {T} rows, {L} "
                f"positions, d {d}); use frobenius(), project() or reconstruct(), or a window of rows")
        out = []
        for r0, r1, maps in self._steps():
            o = sum(torch.nn.functional.pad(torch.einsum("de,bets,ef->btsdf", br.coef * br.w_out, m.matrix, br.w_in),
                                            (0, 0, 0, 0, 0, self.n_pos - m.matrix.shape[-1]))
                    for br, m in zip(self.branches, maps))
            scale = self._scale(r0, r1)
            out.append(o if scale is None else o * scale[:, :, None, None, None])
        return torch.cat(out, dim=1)

    # -- reductions that fit in memory ---------------------------------------------------------------
    def _factor(self, which: Optional[int]) -> Tensor:
        """Z [E, E] with ‖Z·a‖² = ‖Σ_k c_k·W_out,k·diag(a_k)·W_in,k‖²_F for the stacked channel maps a
        of all branches (which=None) or of branch `which` (0-based): the transposed Cholesky factor of
        K = (PᵀP) ⊙ (W Wᵀ) in float64, with K + δI, δ = 1e-14·max diag(K) (raised if K is too close to
        singular), which adds at most δ·‖a‖² to ‖O‖²: 1e-14 of the branches' own scale."""
        if which not in self._factors:
            brs = self.branches if which is None else [self.branches[which]]
            key = FACTORS.key([t for br in brs for t in (br.coef.reshape(1), br.w_out, br.w_in)])
            Z = FACTORS.get(key)
            if Z is None:
                P = torch.cat([(br.coef * br.w_out).double() for br in brs], dim=1)  # [d, E]
                W = torch.cat([br.w_in.double() for br in brs], dim=0)  # [E, d]
                K = (P.T @ P) * (W @ W.T)  # PSD
                jitter = 1e-14 * float(K.diagonal().max().clamp(min=torch.finfo(torch.float64).tiny))
                eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
                for _ in range(8):
                    low, info = torch.linalg.cholesky_ex(K + jitter * eye)
                    if int(info) == 0:
                        break
                    jitter *= 100
                else:
                    raise DiffMambaError("the output-space norm's Gram matrix is not positive semidefinite (non-finite weights?)")
                Z = low.T.to(self.dtype)  # K + δI = Zᵀ Z
                FACTORS.put(key, Z)
            self._factors[which] = Z
        return self._factors[which]

    def summaries(self, *, norm: bool = True, h: Optional[Tensor] = None, direction: Optional[Tensor] = None,
                  per_branch: bool = True) -> OutputSummaries:
        """The Frobenius norms and/or the projections onto `direction` ([d] or [b, d]) of every row,
        total and per branch, in one pass over the maps (see `frobenius` and `project`)."""
        project = direction is not None
        if project and h is None:
            raise DiffMambaError("a projection onto a direction needs h, the block's normed input [batch, pos, d]")
        if project:
            u = direction.to(self.dtype)
            u = u.expand(self.batch, -1) if u.ndim == 1 else u
            if tuple(u.shape) != (self.batch, self.d_model):
                raise DiffMambaError(f"direction must be [d] or [batch, d] = {(self.batch, self.d_model)}, got {tuple(direction.shape)}")
            xs = self._xs(h)
            cs = [br.coef * (u @ br.w_out) for br in self.branches]  # [b, E_k]
        nb = len(self.branches)
        acc: dict[str, list] = {"norm": [], "contrib": [], "bias": []}
        acc.update({f"norm{k}": [] for k in range(nb)})
        acc.update({f"contrib{k}": [] for k in range(nb)})
        for r0, r1, maps in self._steps():
            scale = self._scale(r0, r1)
            def fix(x, s=scale):  # · ρ_t on [b, T, L]
                return x if s is None else x * s.unsqueeze(-1)
            S = min(m.matrix.shape[-1] for m in maps)  # sources S.. are 0 in every map (causal)
            if norm:
                stack = torch.cat([m.matrix[..., :S] for m in maps], dim=1) if nb > 1 else maps[0].matrix[..., :S]
                zn = torch.matmul(self._factor(None), stack.flatten(2)).pow(2).sum(1).sqrt()  # ‖Z·a‖ [b, T·S]
                acc["norm"].append(self._pad(fix(zn.view(*stack.shape[:1], *stack.shape[2:]))))
                if per_branch and nb > 1:
                    for k, m in enumerate(maps):
                        a = m.matrix[..., :S]
                        zk = torch.matmul(self._factor(k), a.flatten(2)).pow(2).sum(1).sqrt()
                        acc[f"norm{k}"].append(self._pad(fix(zk.view(*a.shape[:1], *a.shape[2:]))))
            if project:
                parts = [self._pad(fix(torch.einsum("bets,be,bse->bts", m.matrix[..., :S], cs[k], xs[k][:, :S])))
                         for k, m in enumerate(maps)]
                acc["contrib"].append(sum(parts))
                for k, p in enumerate(parts):
                    acc[f"contrib{k}"].append(p)
                acc["bias"].append((self._rows_scaled(self._bias_rows(maps), r0, r1) * u.unsqueeze(1)).sum(-1))
        def cat(key):
            return torch.cat(acc[key], dim=1) if acc[key] else None

        out = OutputSummaries()
        if norm:
            out.norm = cat("norm")
            out.norm_branches = [cat(f"norm{k}") for k in range(nb)] if nb > 1 and per_branch else [out.norm]
        if project:
            out.contrib = cat("contrib")
            out.contrib_branches = [cat(f"contrib{k}") for k in range(nb)]
            shared = 0 if self.shared_bias is None else (u * self.shared_bias).sum(-1, keepdim=True)
            out.contrib_bias = cat("bias") + shared
        return out

    def frobenius(self) -> Tensor:
        """‖O[t,s]‖_F [b, T, L]: how strongly source s can move the output at t (any input)."""
        return self.summaries(norm=True, per_branch=False).norm

    def project(self, direction: Tensor, h: Tensor) -> Tensor:
        """uᵀ·O[t,s]·h_s [b, T, L]: how much source s moves the output at t along `direction` u ([d]
        or [b, d]); Σ_s of it plus `project_bias(u)` is uᵀ·reconstruct(h)."""
        return self.summaries(norm=False, h=h, direction=direction, per_branch=False).contrib

    def project_bias(self, direction: Tensor) -> Tensor:
        """uᵀ·bias_t [b, T]."""
        u = direction.to(self.dtype)
        return (self.bias() * (u if u.ndim == 2 else u.expand(self.batch, -1)).unsqueeze(1)).sum(-1)
