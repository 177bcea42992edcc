"""Residual blocks (docs/conventions.md, "Blocks"). Every block is pre-norm:
resid_post = resid_pre + mixer_out(RMSNorm(resid_pre)).

- `Block(d_model, mixer)`: one mixer, whatever its class (Mamba-1, Mamba-2, either Diff-S6); the
  architecture registry (`archs.py`) decides which mixer a layer gets, as mamba-ssm's `create_block`.
- `DiffBlock`: Diff-Mamba-1/2, two mixers of reduced size and the differential combination
  mixer_out = (1 − λ_init)·subln(mixer_1(h) − λ·mixer_2(h)) (`differential.Differential`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .differential import Differential
from .implicit_output import OutputAttention
from .mixers.base import Mixer
from .norms import RMSNorm
from .state import Recurrence

Tensor = torch.Tensor


def _residual_add(resid: Tensor, out: Tensor, in_fp32: bool) -> Tensor:
    """transformers keeps the residual in float32 for half-precision models (residual_in_fp32)."""
    if in_fp32 and resid.dtype in (torch.float16, torch.bfloat16):
        return resid.float() + out
    return resid + out


class Block(nn.Module):
    """A plain block: the given mixer behind a pre-norm."""

    def __init__(self, d_model: int, mixer: nn.Module, layer_idx: int, norm_eps: float, residual_in_fp32: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = residual_in_fp32
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.hook_resid_pre = HookPoint()  # [batch, pos, d]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d]  what is added to the residual
        self.hook_resid_post = HookPoint()  # [batch, pos, d]

    def forward(self, resid: Tensor, rec: Recurrence | None = None) -> Tensor:
        resid = self.hook_resid_pre(resid)
        out = self.hook_mixer_out(self.mixer(self.norm(resid.to(self.norm.weight.dtype)), rec))
        return self.hook_resid_post(_residual_add(resid, out, self.residual_in_fp32))


class DiffBlock(Differential, Mixer):
    """A Diff-Mamba-1/2 block: two mixers, λ, subln and the (1 − λ_init) scale.

    As a `Mixer` its implicit attention of kinds "s6" and "block" is that of branch 1 or 2 (mixer_1 /
    mixer_2); kind "output" is the operator of the whole block in the d-dimensional output space,
    (1 − λ_init)·diag(w_subln)·ρ_t·(W_out,1·𝒜₁·W_in,1 − λ·W_out,2·𝒜₂·W_in,2) with ρ_t the subln's
    1/rms (`implicit_output.OutputAttention`; branch 1/2 for one term), whose `reconstruct(h)` of
    the normed input equals `hook_mixer_out`.
    """

    BRANCHES = ("mixer_1", "mixer_2")
    BRANCH_OUTPUT = "hook_out"  # each branch's output hook: [batch, pos, d]
    DESCRIPTION = "a differential block"
    SHARED_CHANNELS = False  # whether the two branches act on the same channels

    def __init__(self, d_model: int, mixer_1: nn.Module, mixer_2: nn.Module, layer_idx: int, norm_eps: float,
                 residual_in_fp32: bool, lambda_form: str, lambda_size: int):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer_1 = mixer_1
        self.mixer_2 = mixer_2
        self._init_differential(layer_idx, lambda_form, lambda_size, d_model)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d]
        self.hook_lambda = HookPoint()  # []  λ
        self.hook_diff = HookPoint()  # [batch, pos, d]  mixer_1 out − λ · mixer_2 out
        self.hook_mixer_out = HookPoint()  # [batch, pos, d]  (1 − λ_init) · subln(diff)
        self.hook_resid_post = HookPoint()  # [batch, pos, d]

    def forward(self, resid: Tensor, rec: Recurrence | None = None) -> Tensor:
        resid = self.hook_resid_pre(resid)
        h = self.norm(resid.to(self.norm.weight.dtype))
        lam = self.hook_lambda(self.lam())
        out = self.hook_mixer_out(self.combine(self.mixer_1(h, rec), self.mixer_2(h, rec), lam))
        return self.hook_resid_post(_residual_add(resid, out, self.residual_in_fp32))

    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        if kind == "output":  # both branches, λ and the subln scale, whichever term is asked for
            return [*self.attention_hooks("block", 1), *self.attention_hooks("block", 2), "hook_lambda",
                    "subln.hook_scale"]
        name = self.BRANCHES[branch - 1]
        return [f"{name}.{n}" for n in self.branch(branch).attention_hooks(kind)]

    def _branch_cache(self, cache, k: int) -> dict:
        prefix = f"{self.BRANCHES[k - 1]}."
        return {key[len(prefix):]: v for key, v in cache.items() if key.startswith(prefix)}

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None, opts=None):
        if kind == "output":
            return self._output(cache, chunk, branch, opts)
        return self.branch(branch).implicit_attention(self._branch_cache(cache, branch), kind, reduce, chunk, opts=opts)

    def _output(self, cache, chunk, branch, opts):
        """Each mixer's own output operator behind the subln gain (1 − λ_init)·w_subln, with
        coefficients 1 and −λ and the subln's 1/rms as the per-target scalar."""
        lam, scale = cache["hook_lambda"], cache["subln.hook_scale"][..., 0]  # [], [b, L]
        gain = (1 - self.lambda_init) * self.subln.weight.detach().to(scale.dtype)  # [d]
        parts = [self.branch(k).implicit_attention(self._branch_cache(cache, k), "output", opts=opts) for k in (1, 2)]
        terms = [p.branches[0].scaled(gain, coef) for p, coef in zip(parts, (torch.ones_like(lam), -lam))]
        b, L = scale.shape
        whole = OutputAttention(terms, names=["branch 1", "branch 2"], n_pos=L, batch=b, row_scale=scale,
                                rows=(parts[0].t0, parts[0].t1), chunk=chunk)
        return whole if branch is None else whole.branch(branch)
