"""Diff-S6, the Diff-Mamba paper's ablation: the difference taken inside one Mamba-1 mixer, at the
S6 level (docs/conventions.md, "Blocks").

Shared in_proj / conv / out_proj, two S6 cores (ssm_1, ssm_2), and before the gate
y = (1 − λ_init)·subln(S6₁(u) − λ·S6₂(u)), with λ in the "qk" form of Diff-Mamba-1.
"""

from __future__ import annotations

import torch
from transformer_lens.hook_points import HookPoint

from .. import implicit, implicit_output
from ..differential import Differential
from ..state import Recurrence
from .base import Mixer, MixerDims
from .mamba1 import S6, ConvFront

Tensor = torch.Tensor


class DiffS6Mixer(ConvFront, Differential, Mixer):
    """Diff-S6 mixer. Implicit attention per branch k: kind "s6" -> α_k [b, E, L, L]; kind "block" ->
    diag(SiLU(z) ⊙ (1 − λ_init)·w_subln·scale_t)·(α_k + diag(D_k))·diag(σ(v))·M with scale_t the
    subln's 1/rms (a row scaling read from the cache); the branches share channels, so
    (𝒜₁ − λ𝒜₂)·x + (bias₁ − λ·bias₂) == hook_gated exactly. Kind "output" (branch None for both, or
    1/2 for one term): W_out·diag(𝒜₁ − λ𝒜₂)·W_in, whose `reconstruct(h)` equals `hook_out`."""

    BRANCHES = ("ssm_1", "ssm_2")
    BRANCH_OUTPUT = "hook_ssm_out"  # each core's output hook: [batch, pos, E]
    DESCRIPTION = "a Diff-S6 layer"
    SHARED_CHANNELS = True  # whether the two branches act on the same channels

    def __init__(self, dims: MixerDims, layer_idx: int):
        super().__init__()
        self._init_front(dims)
        self.ssm_1 = S6(dims)
        self.ssm_2 = S6(dims)
        self._init_differential(layer_idx, "qk", dims.d_state, dims.d_inner)
        self.hook_lambda = HookPoint()  # []  λ
        self.hook_diff = HookPoint()  # [batch, pos, E]  S6₁ − λ·S6₂

    def forward(self, h: Tensor, rec: Recurrence | None = None) -> Tensor:
        """h [batch, pos, d] -> [batch, pos, d]; the two cores share the conv state (stored under both keys)."""
        k1, k2 = self.ssm_1.state_key, self.ssm_2.state_key
        collect = rec is not None and rec.collect
        u, z, conv = self.front(h, rec.conv_in(k1) if rec else None, collect)
        lam = self.hook_lambda(self.lam())
        y1, h1 = self.ssm_1(u, rec.ssm_in(k1) if rec else None, collect)
        y2, h2 = self.ssm_2(u, rec.ssm_in(k2) if rec else None, collect)
        if collect:
            rec.put(k1, conv, h1)
            rec.put(k2, conv, h2)
        return self.back(self.combine(y1, y2, lam), z)

    @property
    def last_path(self) -> str:
        return self.ssm_1.last_path

    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        if kind == "output":  # both branches and λ, whichever term is asked for
            return [*self.attention_hooks("block", 1), *self.attention_hooks("block", 2)[:3], "hook_lambda"]
        core = f"{self.BRANCHES[branch - 1]}."
        names = [core + "hook_dt", core + "hook_B", core + "hook_C"]
        return names + ["hook_conv", "hook_gate", "hook_x", "subln.hook_scale"] if kind == "block" else names

    def _rows(self, cache) -> Tensor:
        """The row scaling of both branches' block maps: SiLU(z)·(1 − λ_init)·w_subln·(subln 1/rms)."""
        f = cache["hook_gate"].dtype
        return cache["hook_gate"] * (1 - self.lambda_init) * self.subln.weight.detach().to(f) * cache["subln.hook_scale"]

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None, opts=None):
        if kind == "output":
            return self._output(cache, chunk, branch, opts or implicit.MapOptions())
        core, prefix = self.branch(branch), f"{self.BRANCHES[branch - 1]}."
        if kind == "s6":
            return core.scan_map(cache, prefix, reduce, chunk, opts)
        return self.block_map(core, cache, prefix, self._rows(cache), reduce, chunk, opts)

    def _output(self, cache, chunk, branch, opts):
        """W_out·diag(𝒜₁ − λ𝒜₂)·W_in as two terms sharing in_proj/out_proj; out_proj's bias is shared."""
        rows, lam = self._rows(cache), cache["hook_lambda"]
        terms = [self.output_branch(self.branch(k), cache, f"{self.BRANCHES[k - 1]}.", rows, opts, coef,
                                    own_out_bias=False) for k, coef in ((1, 1.0), (2, -lam))]
        f = rows.dtype
        shared = self.out_proj.bias.detach().to(f) if opts.include_bias and self.out_proj.bias is not None else None
        b, L, _ = rows.shape
        whole = implicit_output.OutputAttention(terms, names=["branch 1", "branch 2"], n_pos=L, batch=b,
                                                shared_bias=shared, rows=opts.rows, chunk=chunk)
        return whole if branch is None else whole.branch(branch)
