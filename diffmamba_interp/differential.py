"""The differential concept of Diff-Mamba (docs/conventions.md, "Blocks"): two branches, a scalar λ,
and out = (1 − λ_init)·subln(branch_1 − λ·branch_2).

`Differential` is the one mixin for everything differential: the Diff-Mamba-1/2 block
(`blocks.DiffBlock`, branches mixer_1 / mixer_2) and the two Diff-S6 mixers (`mixers.DiffS6Mixer`,
`mixers.DiffS6Mamba2Mixer`, branches ssm_1 / ssm_2). Code that asks "is this differential?" asks
`isinstance(m, Differential)`.

λ_init(i) = 0.8 − 0.6·exp(−0.3·i), i the block index from 0 (not stored). λ is parametrised in one
of the ways of `LAMBDA_FORMS`, with the checkpoints' parameter names, or not at all:
- "q1": λ = sigmoid(Σ_k lambda_q1[k]) + λ_init. Diff-Mamba-2: lambda_q1 ∈ R^d, initialised with
  `torch.randn(d)` (std 1) as upstream's DiffMamba2 block (and so `convert.mamba_to_diffmamba`);
  Diff-S6 in its Mamba-2 form: one scalar, lambda_q1 ∈ R^1 (`torch.randn(1)`, as upstream);
- "qk" (Diff-Mamba-1): λ = exp(lambda_q1·lambda_k1) − exp(lambda_q2·lambda_k2) + λ_init, four
  vectors in R^N;
- None (Diff-S6 in its Mamba-1 form, as upstream's `diffs6block.py`): no λ, no subln, no λ_init; the
  plain difference branch_1 − branch_2. `lam()` is the constant 1 (what `hook_lambda` sees, so that a
  hook can still scale or ablate branch 2) and `lambda_init` is None.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .norms import RMSNorm
from .scan import compute_dtype

Tensor = torch.Tensor

QK_NAMES = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def lambda_init(i: int) -> float:
    """λ_init(i) = 0.8 − 0.6·exp(−0.3·i), with i the block index counted from 0 (not stored)."""
    return 0.8 - 0.6 * math.exp(-0.3 * i)


def _param(module: nn.Module, name: str) -> Tensor:
    """A λ parameter in float32 (float64 stays float64)."""
    p = getattr(module, name)
    return p.to(compute_dtype(p.dtype))


def _init_q1(module: nn.Module, d: int) -> None:
    module.lambda_q1 = nn.Parameter(torch.randn(d))  # [d]  std 1, as upstream (so the sigmoid starts saturated)


def _value_q1(module: nn.Module) -> Tensor:
    return torch.sigmoid(_param(module, "lambda_q1").sum()) + module.lambda_init


def _init_qk(module: nn.Module, n: int, std: float = 0.1) -> None:
    for name in QK_NAMES:
        setattr(module, name, nn.Parameter(torch.randn(n) * std))  # [N]


def _value_qk(module: nn.Module) -> Tensor:
    q1, k1, q2, k2 = (_param(module, n) for n in QK_NAMES)
    return torch.exp(q1 @ k1) - torch.exp(q2 @ k2) + module.lambda_init


# form -> (create the parameters on a module given their size, λ of that module)
LAMBDA_FORMS = {"q1": (_init_q1, _value_q1), "qk": (_init_qk, _value_qk)}


class Differential(nn.Module):
    """Mixin: two branches whose outputs are subtracted with a learnt λ, normalised by subln and
    scaled by (1 − λ_init). Subclasses call `_init_differential`, define the hooks `hook_lambda` ([])
    and `hook_diff` (branch_1 − λ·branch_2) with their shapes, and in forward run
    `lam = self.hook_lambda(self.lam())` before the branches, then `self.combine(a, b, lam)`.
    """

    BRANCHES: tuple[str, str]  # attribute names of the two branches
    BRANCH_OUTPUT: str  # the hook of a branch that holds its output (activation patching of "branch")
    DESCRIPTION: str  # how an error message names a layer of this kind
    # whether both branches act on the same channels (Diff-S6, Mamba-1 form) or have their own projections
    SHARED_CHANNELS: bool
    SHARED_CONV: bool = False  # whether the two branches' scans read one conv state (Diff-S6, Mamba-1 form)

    def _init_differential(self, layer_idx: int, lambda_form: str | None, lambda_size: int = 0,
                           subln_size: int = 0) -> None:
        """λ of `lambda_form` (a key of LAMBDA_FORMS, with vectors of `lambda_size`) and subln over
        `subln_size`; lambda_form None: neither (the plain difference)."""
        self.layer_idx = layer_idx
        self.lambda_form = lambda_form
        if lambda_form is None:
            self.lambda_init, self.subln = None, None
            return
        self.lambda_init = lambda_init(layer_idx)
        LAMBDA_FORMS[lambda_form][0](self, lambda_size)
        self.subln = RMSNorm(subln_size, eps=1e-5)

    def lam(self) -> Tensor:
        """λ as a 0-d float32 tensor (float64 in a float64 model); the constant 1 without a λ."""
        if self.lambda_form is None:
            p = next(self.parameters())
            return torch.ones((), dtype=compute_dtype(p.dtype), device=p.device)
        return LAMBDA_FORMS[self.lambda_form][1](self)

    def branch(self, k: int) -> nn.Module:
        """Branch 1 or 2."""
        return getattr(self, self.BRANCHES[k - 1])

    def combine(self, a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
        """(1 − λ_init)·subln(a − λ·b), with `hook_diff` on the difference; a − λ·b without a λ."""
        diff = self.hook_diff(a - lam.to(a.dtype) * b)
        if self.subln is None:
            return diff
        return (1 - self.lambda_init) * self.subln(diff)

    def branch_terms(self, a: Tensor, b: Tensor, lam: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """The two terms that `combine` adds up, with subln's 1/rms `scale` frozen (read from
        `subln.hook_scale`): (1 − λ_init)·w ⊙ (a·scale) and (1 − λ_init)·w ⊙ (−λ·b·scale).
        Their sum is `combine(a, b, lam)`; the branch lens maps each to the logits."""
        g = (1 - self.lambda_init) * self.subln.weight.to(a.dtype)
        return g * (a * scale), g * (-lam * b * scale)
