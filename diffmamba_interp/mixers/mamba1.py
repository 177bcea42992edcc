"""The Mamba-1 (S6) mixer (docs/conventions.md, "Blocks"), with a hook on every intermediate.

out_proj(S6(SiLU(conv(x))) ⊙ SiLU(z)), x, z = in_proj(h). Parameter names are the checkpoints' own
(in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj). Reference implementations: mamba-ssm's
`modules/mamba_simple.py`, transformers' `MambaMixer`.

`hook_ssm_state` is materialised only when something hooks it (a TransformerLens hook, or
`capture_states = True`, which `HookedMamba.capture_states()` sets for nnsight users). Patching it
changes that position's readout y_t = C_t·h_t + D·u_t only; the recurrence is not re-run.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from .. import implicit, implicit_output
from ..scan import causal_conv1d, selective_scan, selective_state_step
from ..state import Recurrence
from .base import Mixer, MixerDims, ScanUnit, init_dt_bias

Tensor = torch.Tensor


class S6Core(ScanUnit):
    """The selective part of a Mamba-1 mixer: x_proj, dt_proj, A_log, D and their hooks (a core of
    Diff-S6's Mamba-1 form, `diffs6.S6Branch`, reads its parameters from the mixer instead)."""

    def _init_s6(self, dims: MixerDims) -> None:
        E, N, R = dims.d_inner, dims.d_state, dims.dt_rank
        self.d_state, self.dt_rank, self.d_conv, self.scan_width = N, R, dims.d_conv, E
        self.capture_states = False
        self.last_path = ""
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(E))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # [E, N]
        self.D = nn.Parameter(torch.ones(E))  # [E]
        self.hook_dt = HookPoint()  # [batch, pos, E]  Δ after softplus
        self.hook_B = HookPoint()  # [batch, pos, N]
        self.hook_C = HookPoint()  # [batch, pos, N]
        self.hook_ssm_state = HookPoint()  # [batch, pos, E, N]  h_t (only when hooked)
        self.hook_ssm_out = HookPoint()  # [batch, pos, E]  C·h + D⊙u

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per batch row: conv state (E, K − 1) and SSM state (E, N)."""
        return (self.scan_width, self.d_conv - 1), (self.scan_width, self.d_state)

    def ssm(self, u: Tensor, state: Tensor | None = None, want_final: bool = False,
            in_place: bool = False) -> tuple[Tensor, Tensor | None]:
        """u [batch, pos, E], state h_{−1} [batch, E, N] (zeros when None) -> (y [batch, pos, E],
        the state after the last position when `want_final`). One position from a state takes the
        O(1) step, which overwrites `state` when `in_place` (`Recurrence.in_place`)."""
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.hook_dt(F.softplus(self.dt_proj(dt_low)))  # [batch, pos, E]
        B, C = self.hook_B(B), self.hook_C(C)  # [batch, pos, N]
        want = self.wants_states()
        if state is not None and u.shape[1] == 1 and not want:  # decoding: h_t from h_{t−1}
            y, final = selective_state_step(state, u[:, 0], dt[:, 0], self.A(), B[:, 0], C[:, 0], self.D, in_place=in_place)
            y, self.last_path = y[:, None], "step"
        else:
            res = selective_scan(u, dt, self.A(), B, C, self.D, initial_state=state, return_final_state=want_final,
                                 return_states=want)
            y, states, final, self.last_path = res.y, res.states, res.final_state, res.path
            if want:
                states = self.hook_ssm_state(states)
                y = (torch.einsum("blen,bln->ble", states, C.to(states.dtype)) + self.D * u.to(states.dtype)).to(u.dtype)
        return self.hook_ssm_out(y), (final if want_final else None)

    def scan_map(self, cache: Mapping[str, Tensor], prefix: str, reduce, chunk, opts=None) -> Tensor:
        """The S6 map α of this core ([b, E, T, L]; α + diag(D) with opts.include_D) from the cached
        hook_dt/B/C under `prefix`."""
        dt = cache[prefix + "hook_dt"]
        opts = opts or implicit.MapOptions()
        D = self.D.detach().to(dt.dtype) if opts.with_D("s6") else None
        return implicit.s6_map(dt, self.A().detach().to(dt.dtype), cache[prefix + "hook_B"], cache[prefix + "hook_C"],
                               reduce, chunk, opts, D)


class ConvFront(nn.Module):
    """in_proj + depthwise causal conv before the scan, gate and out_proj after it (Mamba-1, Diff-S6)."""

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

    def front(self, h: Tensor, conv_state: Tensor | None = None, want_state: bool = False):
        """h [batch, pos, d], conv_state [batch, E, K − 1] (the K − 1 inputs before h; zeros when None)
        -> (u, z) [batch, pos, E] and the conv state after h (None unless `want_state`)."""
        x, z = self.hook_in_proj(self.in_proj(h)).chunk(2, dim=-1)
        x, z = self.hook_x(x), self.hook_z(z)
        conv = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, initial_state=conv_state, return_final_state=want_state)
        u = self.hook_ssm_in(F.silu(self.hook_conv(conv.out)))
        return u, z, conv.final_state

    def back(self, y: Tensor, z: Tensor) -> Tensor:
        """y [batch, pos, E], z [batch, pos, E] -> [batch, pos, d]."""
        gated = self.hook_gated(y * self.hook_gate(F.silu(z)))
        return self.hook_out(self.out_proj(gated))

    def block_map(self, core: S6Core, cache: Mapping[str, Tensor], core_prefix: str, rows: Tensor, reduce, chunk,
                  opts=None):
        """The whole-block map of `core` behind this front, with the row scaling `rows` [b, L, E]."""
        dt = cache[core_prefix + "hook_dt"]
        return implicit.s6_block_map(dt, core.A().detach().to(dt.dtype), cache[core_prefix + "hook_B"],
                                     cache[core_prefix + "hook_C"], core.D.detach().to(dt.dtype), cache["hook_conv"],
                                     rows, self.conv1d, reduce, chunk, opts)

    def output_branch(self, core: S6Core, cache: Mapping[str, Tensor], core_prefix: str, rows: Tensor, opts,
                      coef: Tensor | float = 1.0, own_out_bias: bool = True) -> implicit_output.OutputBranch:
        """`core`'s term of the output-space operator: W_out·diag(block map)·W_in (in_proj's x rows),
        with in_proj's and (own_out_bias) out_proj's biases when opts.include_bias."""
        f, E = rows.dtype, self.d_inner
        opts = opts or implicit.MapOptions()

        def maps(t0: int, t1: int):  # rows t0..t1−1 over the sources 0..t1−1 (causal: the rest is 0)
            return self.block_map(core, implicit.prefix(cache, t1), core_prefix, rows[:, :t1], None, None,
                                  dataclasses.replace(opts, rows=(t0, t1)))

        with_bias = opts.include_bias
        b_in = self.in_proj.bias.detach()[:E].to(f) if with_bias and self.in_proj.bias is not None else None
        b_out = self.out_proj.bias.detach().to(f) if with_bias and own_out_bias and self.out_proj.bias is not None else None
        return implicit_output.OutputBranch(maps, self.in_proj.weight.detach()[:E].to(f), self.out_proj.weight.detach().to(f),
                                            torch.as_tensor(coef, dtype=f), b_in, b_out)


class Mamba1Mixer(ConvFront, S6Core, Mixer):
    """Mamba-1 (S6) mixer: out_proj(S6(SiLU(conv(x))) ⊙ SiLU(z)), x, z = in_proj(h).

    Implicit attention: kind "s6" -> α [b, E, L, L]; kind "block" -> diag(SiLU(z))·(α + diag(D))·
    diag(σ(v))·M and its conv-bias term, whose `reconstruct(hook_x)` equals `hook_gated`; kind
    "output" -> W_out·(that map)·W_in (`implicit_output.OutputAttention`), whose `reconstruct(h)` of
    the block's normed input equals `hook_out`.
    """

    def __init__(self, dims: MixerDims):
        super().__init__()
        self._init_front(dims)
        self._init_s6(dims)

    def forward(self, h: Tensor, rec: Recurrence | None = None) -> Tensor:
        """h [batch, pos, d] -> [batch, pos, d]; `rec` carries the state in and out (`HookedMamba`)."""
        key, collect = self.state_key, rec is not None and rec.collect
        u, z, conv = self.front(h, rec.conv_in(key) if rec else None, collect)
        y, final = self.ssm(u, rec.ssm_in(key) if rec else None, collect, in_place=bool(rec and rec.in_place))
        if collect:
            rec.put(key, conv, final)
        return self.back(y, z)

    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        names = ["hook_dt", "hook_B", "hook_C"]
        return names if kind == "s6" else names + ["hook_conv", "hook_gate", "hook_x"]

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None, opts=None):
        if kind == "s6":
            return self.scan_map(cache, "", reduce, chunk, opts)
        if kind == "block":
            return self.block_map(self, cache, "", cache["hook_gate"], reduce, chunk, opts)
        b, L, _ = cache["hook_gate"].shape
        return implicit_output.OutputAttention([self.output_branch(self, cache, "", cache["hook_gate"], opts)],
                                               names=["layer"], n_pos=L, batch=b, rows=(opts or implicit.MapOptions()).rows,
                                               chunk=chunk)
