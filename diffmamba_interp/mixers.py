"""Mamba-1 (S6) and Mamba-2 (SSD) mixers, and Diff-S6, with a hook on every intermediate (SPEC §1).

Parameter names are the checkpoints' own (in_proj, conv1d, x_proj, dt_proj, dt_bias, A_log, D, norm,
out_proj), so loading a checkpoint is a prefix mapping. Reference implementations: mamba-ssm's
`modules/mamba_simple.py` and `modules/mamba2.py`, transformers' `MambaMixer` / `Mamba2Mixer`.

`hook_ssm_state` is materialised only when something hooks it (a TransformerLens hook, or
`capture_states = True` on the mixer, which `HookedMamba.capture_states()` sets for nnsight users).
Patching it changes that position's readout y_t = C_t·h_t + D·u_t; the recurrence is not re-run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from .config import MixerDims
from .lambdas import init_lambda_vectors, lambda_init, lambda_qk
from .norms import GatedRMSNorm, RMSNorm
from .scan import causal_conv1d, compute_dtype, selective_scan, ssd


def is_hooked(hp: HookPoint) -> bool:
    """Whether a forward hook is attached to `hp` (TransformerLens or plain torch hooks)."""
    return bool(hp._forward_hooks)


def _init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """softplus⁻¹ of Δ drawn log-uniformly in [dt_min, dt_max] (mamba-ssm's init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class S6Core(nn.Module):
    """The selective part of a Mamba-1 mixer: x_proj, dt_proj, A_log, D and their hooks."""

    def _init_s6(self, dims: MixerDims) -> None:
        E, N, R = dims.d_inner, dims.d_state, dims.dt_rank
        self.d_state, self.dt_rank = N, R
        self.capture_states = False
        self.last_path = ""
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_init_dt_bias(E))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # [E, N]
        self.D = nn.Parameter(torch.ones(E))  # [E]
        self.hook_dt = HookPoint()  # [batch, pos, E]  Δ after softplus
        self.hook_B = HookPoint()  # [batch, pos, N]
        self.hook_C = HookPoint()  # [batch, pos, N]
        self.hook_ssm_state = HookPoint()  # [batch, pos, E, N]  h_t (only when hooked)
        self.hook_ssm_out = HookPoint()  # [batch, pos, E]  C·h + D⊙u

    def ssm(self, u: torch.Tensor) -> torch.Tensor:
        """u [batch, pos, E] -> y [batch, pos, E]."""
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.hook_dt(F.softplus(self.dt_proj(dt_low)))  # [batch, pos, E]
        B, C = self.hook_B(B), self.hook_C(C)  # [batch, pos, N]
        A = -torch.exp(self.A_log.to(compute_dtype(self.A_log.dtype)))  # [E, N]
        want = self.capture_states or is_hooked(self.hook_ssm_state)
        y, states, self.last_path = selective_scan(u, dt, A, B, C, self.D, return_states=want)
        if want:
            states = self.hook_ssm_state(states)
            y = (torch.einsum("blen,bln->ble", states, C.to(states.dtype)) + self.D * u.to(states.dtype)).to(u.dtype)
        return self.hook_ssm_out(y)


class _ConvFront(nn.Module):
    """in_proj + depthwise causal conv, shared by the Mamba-1 mixer and Diff-S6."""

    def _init_front(self, dims: MixerDims) -> None:
        E = dims.d_inner
        self.d_inner = E
        self.in_proj = nn.Linear(dims.d_model, 2 * E, bias=dims.bias)
        self.conv1d = nn.Conv1d(E, E, dims.d_conv, groups=E, padding=dims.d_conv - 1, bias=dims.conv_bias)
        self.out_proj = nn.Linear(E, dims.d_model, bias=dims.bias)
        self.hook_in_proj = HookPoint()  # [batch, pos, 2E]
        self.hook_x = HookPoint()  # [batch, pos, E]
        self.hook_z = HookPoint()  # [batch, pos, E]
        self.hook_conv = HookPoint()  # [batch, pos, E]  causal conv output, before SiLU
        self.hook_ssm_in = HookPoint()  # [batch, pos, E]  u = SiLU(conv)
        self.hook_gate = HookPoint()  # [batch, pos, E]  SiLU(z)
        self.hook_gated = HookPoint()  # [batch, pos, E]  y ⊙ SiLU(z)
        self.hook_out = HookPoint()  # [batch, pos, d]

    def front(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [batch, pos, d] -> (u, z), both [batch, pos, E]."""
        x, z = self.hook_in_proj(self.in_proj(h)).chunk(2, dim=-1)
        x, z = self.hook_x(x), self.hook_z(z)
        v, self.conv_path = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias)
        u = self.hook_ssm_in(F.silu(self.hook_conv(v)))
        return u, z

    def back(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [batch, pos, E], z [batch, pos, E] -> [batch, pos, d]."""
        gated = self.hook_gated(y * self.hook_gate(F.silu(z)))
        return self.hook_out(self.out_proj(gated))


class Mamba1Mixer(_ConvFront, S6Core):
    """Mamba-1 (S6) mixer: out_proj(S6(SiLU(conv(x))) ⊙ SiLU(z)), x, z = in_proj(h)."""

    def __init__(self, dims: MixerDims):
        super().__init__()
        self._init_front(dims)
        self._init_s6(dims)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, z = self.front(h)
        return self.back(self.ssm(u), z)


class S6(S6Core):
    """One S6 core as a submodule (the two branches of Diff-S6)."""

    def __init__(self, dims: MixerDims):
        super().__init__()
        self._init_s6(dims)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.ssm(u)


class DiffS6Mixer(_ConvFront):
    """Diff-S6 (the paper's ablation): shared in_proj/conv/out_proj, two S6 cores, and
    y = (1 − λ_init) · subln(S6₁(u) − λ·S6₂(u)) before the gate, λ as in Diff-Mamba-1."""

    def __init__(self, dims: MixerDims, layer_idx: int):
        super().__init__()
        self._init_front(dims)
        self.ssm_1 = S6(dims)
        self.ssm_2 = S6(dims)
        self.layer_idx = layer_idx
        init_lambda_vectors(self, dims.d_state)
        self.subln = RMSNorm(dims.d_inner, eps=1e-5)
        self.hook_lambda = HookPoint()  # []  λ
        self.hook_diff = HookPoint()  # [batch, pos, E]  S6₁ − λ·S6₂

    def lam(self) -> torch.Tensor:
        """λ as a 0-d float32 tensor (float64 in a float64 model)."""
        return lambda_qk(self, self.layer_idx)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, z = self.front(h)
        lam = self.hook_lambda(self.lam())
        diff = self.hook_diff(self.ssm_1(u) - lam.to(u.dtype) * self.ssm_2(u))
        y = (1 - lambda_init(self.layer_idx)) * self.subln(diff)
        return self.back(y, z)

    @property
    def last_path(self) -> str:
        return self.ssm_1.last_path


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD) mixer: z, xBC, dt = in_proj(h); x, B, C = SiLU(conv(xBC));
    y = SSD(x, Δ, A, B, C) + D·x; out_proj(gated_norm(y, SiLU(z)))."""

    def __init__(self, dims: MixerDims):
        super().__init__()
        E, N, G, H = dims.d_inner, dims.d_state, dims.n_groups, dims.n_heads
        self.d_inner, self.d_state, self.n_groups, self.n_heads, self.head_dim = E, N, G, H, dims.head_dim
        self.chunk_size = dims.chunk_size
        self.time_step_limit = dims.time_step_limit
        self.conv_dim = E + 2 * G * N
        self.capture_states = False
        self.last_path = ""
        self.in_proj = nn.Linear(dims.d_model, 2 * E + 2 * G * N + H, bias=dims.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, dims.d_conv, groups=self.conv_dim, padding=dims.d_conv - 1, bias=dims.conv_bias
        )
        self.dt_bias = nn.Parameter(_init_dt_bias(H))  # [H]
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))  # [H]
        self.D = nn.Parameter(torch.ones(H))  # [H]
        self.norm = GatedRMSNorm(E, n_groups=G, eps=dims.norm_eps)
        self.out_proj = nn.Linear(E, dims.d_model, bias=dims.bias)
        self.hook_in_proj = HookPoint()  # [batch, pos, 2E + 2GN + H]
        self.hook_z = HookPoint()  # [batch, pos, E]
        self.hook_xBC = HookPoint()  # [batch, pos, E + 2GN]
        self.hook_conv = HookPoint()  # [batch, pos, E + 2GN]  causal conv output, before SiLU
        self.hook_ssm_in = HookPoint()  # [batch, pos, H, P]  x
        self.hook_B = HookPoint()  # [batch, pos, G, N]
        self.hook_C = HookPoint()  # [batch, pos, G, N]
        self.hook_dt = HookPoint()  # [batch, pos, H]  Δ after softplus and clamp
        self.hook_ssm_state = HookPoint()  # [batch, pos, H, P, N]  h_t (only when hooked)
        self.hook_ssm_out = HookPoint()  # [batch, pos, H, P]  y + D·x
        self.hook_gate = HookPoint()  # [batch, pos, E]  SiLU(z)
        self.hook_out = HookPoint()  # [batch, pos, d]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, L, _ = h.shape
        E, G, N, H, P = self.d_inner, self.n_groups, self.d_state, self.n_heads, self.head_dim
        z, xBC, dt = self.hook_in_proj(self.in_proj(h)).split([E, self.conv_dim, H], dim=-1)
        z, xBC = self.hook_z(z), self.hook_xBC(xBC)
        v, self.conv_path = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias)
        x, B, C = F.silu(self.hook_conv(v)).split([E, G * N, G * N], dim=-1)
        x = self.hook_ssm_in(x.reshape(b, L, H, P))
        B = self.hook_B(B.reshape(b, L, G, N))
        C = self.hook_C(C.reshape(b, L, G, N))
        lo, hi = self.time_step_limit
        dt = self.hook_dt(F.softplus(dt + self.dt_bias).clamp(lo, hi))  # [batch, pos, H]
        A = -torch.exp(self.A_log.to(compute_dtype(self.A_log.dtype)))  # [H]
        want = self.capture_states or is_hooked(self.hook_ssm_state)
        y, states, self.last_path = ssd(x, dt, A, B, C, self.D, chunk_size=self.chunk_size, return_states=want)
        if want:
            states = self.hook_ssm_state(states)
            Ch = C.to(states.dtype).repeat_interleave(H // G, dim=2)  # [batch, pos, H, N]
            y = torch.einsum("blhpn,blhn->blhp", states, Ch) + self.D.view(H, 1) * x.to(states.dtype)
            y = y.to(x.dtype)
        y = self.hook_ssm_out(y)
        gate = self.hook_gate(F.silu(z))
        return self.hook_out(self.out_proj(self.norm(y.reshape(b, L, E), gate)))
