"""Residual blocks: plain (one mixer) and differential (two mixers, SPEC §1).

Every block is pre-norm: resid_post = resid_pre + mixer_out(RMSNorm(resid_pre)).
Differential (Diff-Mamba-1/2): mixer_out = (1 − λ_init) · subln(mixer_1(h) − λ · mixer_2(h)).
Diff-S6 layers are plain blocks whose mixer is a `DiffS6Mixer` (the difference inside the mixer).
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .config import MambaConfig
from .lambdas import init_lambda_vectors, lambda_init, lambda_q1, lambda_qk
from .mixers import DiffS6Mixer, Mamba1Mixer, Mamba2Mixer
from .norms import RMSNorm


def _residual_add(resid: torch.Tensor, out: torch.Tensor, in_fp32: bool) -> torch.Tensor:
    """transformers keeps the residual in float32 for half-precision models (residual_in_fp32)."""
    if in_fp32 and resid.dtype in (torch.float16, torch.bfloat16):
        return resid.float() + out
    return resid + out


class Block(nn.Module):
    """A plain block: Mamba-1, Mamba-2 or Diff-S6 mixer behind a shared pre-norm."""

    def __init__(self, cfg: MambaConfig, i: int):
        super().__init__()
        self.layer_idx = i
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        dims = cfg.mixer_dims()
        if cfg.family == "mamba2":
            self.mixer = Mamba2Mixer(dims)
        elif cfg.arch == "diffs6" and cfg.is_diff_layer(i):
            self.mixer = DiffS6Mixer(dims, i)
        else:
            self.mixer = Mamba1Mixer(dims)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d]  what is added to the residual
        self.hook_resid_post = HookPoint()  # [batch, pos, d]

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        out = self.hook_mixer_out(self.mixer(self.norm(resid.to(self.norm.weight.dtype))))
        return self.hook_resid_post(_residual_add(resid, out, self.residual_in_fp32))


class DiffBlock(nn.Module):
    """A Diff-Mamba-1/2 block: two mixers of halved size, λ, subln and the (1 − λ_init) scale."""

    def __init__(self, cfg: MambaConfig, i: int):
        super().__init__()
        self.layer_idx = i
        self.lambda_init = lambda_init(i)
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        dims = cfg.mixer_dims(differential=True)
        mixer = Mamba2Mixer if cfg.arch == "diffmamba2" else Mamba1Mixer
        self.mixer_1 = mixer(dims)
        self.mixer_2 = mixer(dims)
        if cfg.arch == "diffmamba2":
            self.lambda_q1 = nn.Parameter(torch.randn(cfg.d_model) * 0.1)  # [d]
            self._lambda = lambda_q1
        else:
            init_lambda_vectors(self, cfg.d_state)  # lambda_{q1,k1,q2,k2} [N]
            self._lambda = lambda_qk
        self.subln = RMSNorm(cfg.d_model, eps=1e-5)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d]
        self.hook_lambda = HookPoint()  # []  λ
        self.hook_diff = HookPoint()  # [batch, pos, d]  mixer_1 out − λ · mixer_2 out
        self.hook_mixer_out = HookPoint()  # [batch, pos, d]  (1 − λ_init) · subln(diff)
        self.hook_resid_post = HookPoint()  # [batch, pos, d]

    def lam(self) -> torch.Tensor:
        """λ as a 0-d float32 tensor (float64 in a float64 model)."""
        return self._lambda(self, self.layer_idx)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        h = self.norm(resid.to(self.norm.weight.dtype))
        lam = self.hook_lambda(self.lam())
        diff = self.hook_diff(self.mixer_1(h) - lam.to(h.dtype) * self.mixer_2(h))
        out = self.hook_mixer_out((1 - self.lambda_init) * self.subln(diff))
        return self.hook_resid_post(_residual_add(resid, out, self.residual_in_fp32))


def make_block(cfg: MambaConfig, i: int) -> nn.Module:
    if cfg.arch in ("diffmamba1", "diffmamba2") and cfg.is_diff_layer(i):
        return DiffBlock(cfg, i)
    return Block(cfg, i)
