"""Diff-S6, the Diff-Mamba paper's ablation: the difference taken inside one Mamba-1 mixer, at the
S6 level (docs/conventions.md, "Blocks").

Shared in_proj / conv / out_proj, two S6 cores (ssm_1, ssm_2), and before the gate
y = (1 − λ_init)·subln(S6₁(u) − λ·S6₂(u)), with λ in the "qk" form of Diff-Mamba-1.
"""

from __future__ import annotations

import torch
from transformer_lens.hook_points import HookPoint

from ..differential import Differential
from ..state import Recurrence
from .base import Mixer, MixerDims
from .mamba1 import S6, ConvFront

Tensor = torch.Tensor


class DiffS6Mixer(ConvFront, Differential, Mixer):
    """Diff-S6 mixer. Implicit attention per branch k: kind "s6" -> α_k [b, E, L, L]; kind "block" ->
    diag(SiLU(z) ⊙ (1 − λ_init)·w_subln·scale_t)·(α_k + diag(D_k))·diag(σ(v))·M with scale_t the
    subln's 1/rms (a row scaling read from the cache); the branches share channels, so
    (𝒜₁ − λ𝒜₂)·x + (bias₁ − λ·bias₂) == hook_gated exactly."""

    BRANCHES = ("ssm_1", "ssm_2")
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
        core = f"{self.BRANCHES[branch - 1]}."
        names = [core + "hook_dt", core + "hook_B", core + "hook_C"]
        return names + ["hook_conv", "hook_gate", "hook_x", "subln.hook_scale"] if kind == "block" else names

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None):
        core, prefix = self.branch(branch), f"{self.BRANCHES[branch - 1]}."
        if kind == "s6":
            return core.scan_map(cache, prefix, reduce, chunk)
        f = cache["hook_gate"].dtype
        rows = cache["hook_gate"] * (1 - self.lambda_init) * self.subln.weight.detach().to(f) * cache["subln.hook_scale"]
        return self.block_map(core, cache, prefix, rows, reduce, chunk)
