"""The λ of a differential block (SPEC §1), defined once for Diff-Mamba-1/2 and Diff-S6."""

from __future__ import annotations

import math

import torch
from torch import nn

from .scan import compute_dtype


def lambda_init(i: int) -> float:
    """λ_init(i) = 0.8 − 0.6·exp(−0.3·i), with i the block index counted from 0 (not stored)."""
    return 0.8 - 0.6 * math.exp(-0.3 * i)


def _param(module: nn.Module, name: str) -> torch.Tensor:
    """A λ parameter in float32 (float64 stays float64)."""
    p = getattr(module, name)
    return p.to(compute_dtype(p.dtype))


def lambda_q1(module: nn.Module, i: int) -> torch.Tensor:
    """Diff-Mamba-2: λ = sigmoid(Σ_k lambda_q1[k]) + λ_init (a 0-d float32/float64 tensor)."""
    return torch.sigmoid(_param(module, "lambda_q1").sum()) + lambda_init(i)


def init_lambda_vectors(module: nn.Module, n: int, std: float = 0.1) -> None:
    """Diff-Mamba-1 / Diff-S6: the four vectors lambda_q1, lambda_k1, lambda_q2, lambda_k2 in R^n."""
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        setattr(module, name, nn.Parameter(torch.randn(n) * std))


def lambda_qk(module: nn.Module, i: int) -> torch.Tensor:
    """Diff-Mamba-1 / Diff-S6: λ = exp(q1·k1) − exp(q2·k2) + λ_init (a 0-d float32/float64 tensor)."""
    q1, k1, q2, k2 = (_param(module, n) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
    return torch.exp(q1 @ k1) - torch.exp(q2 @ k2) + lambda_init(i)
