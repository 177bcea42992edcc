"""RMSNorm and the gated group RMSNorm of Mamba-2, with their hooks."""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .scan import compute_dtype


class RMSNorm(nn.Module):
    """y = w ⊙ x · scale, scale = 1 / sqrt(mean(x²) + eps), computed in float32 (as transformers)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]  the multiplier 1/rms
        self.hook_normalized = HookPoint()  # [batch, pos, d]  output, gain applied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))
        scale = self.hook_scale(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.hook_normalized(self.weight * (xf * scale).to(x.dtype))


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated norm: w ⊙ RMSNorm_groupwise(y ⊙ gate), gate = SiLU(z), over G groups of E/G.

    Takes the already-activated gate, so the mixer's `hook_gate` holds SiLU(z) exactly as used here.
    """

    def __init__(self, d: int, n_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, G]  1/rms of each group
        self.hook_normalized = HookPoint()  # [batch, pos, E]

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        f = compute_dtype(y.dtype)
        g = (y.to(f) * gate.to(f)).unflatten(-1, (self.n_groups, -1))  # [batch, pos, G, E/G]
        scale = self.hook_scale(torch.rsqrt(g.pow(2).mean(-1) + self.eps))  # [batch, pos, G]
        out = (g * scale.unsqueeze(-1)).flatten(-2)
        return self.hook_normalized(self.weight * out.to(y.dtype))
