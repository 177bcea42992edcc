"""The Mamba-2 (SSD) mixer (docs/conventions.md, "Blocks"), with a hook on every intermediate.

z, xBC, dt = in_proj(h); x, B, C = SiLU(conv(xBC)); y = SSD(x, Δ, A, B, C) + D·x;
out_proj(gated_norm(y, SiLU(z))). Parameter names are the checkpoints' own (in_proj, conv1d, dt_bias,
A_log, D, norm, out_proj). Reference implementations: mamba-ssm's `modules/mamba2.py`,
transformers' `Mamba2Mixer`. `hook_ssm_state` is materialised only when hooked (see mamba1.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

import dataclasses

from .. import implicit, implicit_output
from ..norms import GatedRMSNorm
from ..scan import causal_conv1d, ssd, ssd_state_step
from ..state import Recurrence
from .base import Mixer, MixerDims, ScanUnit, init_dt_bias

Tensor = torch.Tensor


SSD_HOOKS = {  # the hook points of one SSD scan unit (a Mamba-2 mixer, a Diff-Mamba-2 branch) and their shapes
    "hook_in_proj": "[batch, pos, 2E + 2GN + H]",
    "hook_z": "[batch, pos, E]",
    "hook_xBC": "[batch, pos, E + 2GN]",
    "hook_conv": "[batch, pos, E + 2GN]  causal conv output, before SiLU",
    "hook_ssm_in": "[batch, pos, H, P]  x",
    "hook_B": "[batch, pos, G, N]",
    "hook_C": "[batch, pos, G, N]",
    "hook_dt": "[batch, pos, H]  Δ after softplus and clamp",
    "hook_ssm_state": "[batch, pos, H, P, N]  h_t (only when hooked)",
    "hook_ssm_out": "[batch, pos, H, P]  y + D·x",
    "hook_gate": "[batch, pos, E]  SiLU(z)",
}


def add_ssd_hooks(unit: nn.Module) -> None:
    """Give an SSD scan unit its `SSD_HOOKS`, in that order."""
    for name in SSD_HOOKS:
        setattr(unit, name, HookPoint())


class Mamba2Mixer(ScanUnit, Mixer):
    """Mamba-2 (SSD) mixer.

    Implicit attention: kind "s6" -> the per-head SSD map α [b, H, L, L]; kind "block" -> per channel
    diag(w ⊙ SiLU(z_t) / rms_group(t))·(α + diag(D))·diag(σ(v))·M and its conv-bias term, whose
    `reconstruct(x part of hook_xBC)` equals `norm.hook_normalized`; kind "output" -> W_out·(that map)·
    W_in (`implicit_output.OutputAttention`), whose `reconstruct(h)` of the block's normed input
    equals `hook_out`.
    """

    @staticmethod
    def check_dims(dims: MixerDims) -> str | None:
        """Why these sizes cannot build a Mamba-2 mixer, or None."""
        if dims.head_dim <= 0 or dims.d_inner % dims.head_dim:
            return f"d_inner {dims.d_inner} is not a multiple of head_dim {dims.head_dim}"
        if dims.n_heads % dims.n_groups:
            return f"n_heads {dims.n_heads} is not a multiple of n_groups {dims.n_groups}"
        return None

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
        self.dt_bias = nn.Parameter(init_dt_bias(H))  # [H]
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))  # [H]
        self.D = nn.Parameter(torch.ones(H))  # [H]
        self.norm = GatedRMSNorm(E, n_groups=G, eps=dims.norm_eps)
        self.out_proj = nn.Linear(E, dims.d_model, bias=dims.bias)
        add_ssd_hooks(self)
        self.hook_out = HookPoint()  # [batch, pos, d]

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per batch row: conv state (E + 2GN, K − 1) and SSM state (H, P, N)."""
        return (self.conv_dim, self.conv1d.kernel_size[0] - 1), (self.n_heads, self.head_dim, self.d_state)

    def forward(self, h: Tensor, rec: Recurrence | None = None) -> Tensor:
        """h [batch, pos, d] -> [batch, pos, d]; `rec` carries the state in and out (`HookedMamba`)."""
        y, gate = ssd_unit(self, h, rec)
        return self.hook_out(self.out_proj(self.norm(y, gate)))

    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        names = ["hook_dt", "hook_B", "hook_C"]
        return names if kind == "s6" else names + ["hook_conv", "hook_gate", "hook_xBC", "norm.hook_scale"]

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None, opts=None):
        dt, B, C = cache["hook_dt"], cache["hook_B"], cache["hook_C"]
        A = self.A().detach().to(dt.dtype)
        opts = opts or implicit.MapOptions()
        if kind == "s6":
            D = self.D.detach().to(dt.dtype) if opts.with_D("s6") else None
            return implicit.ssd_map(dt, A, B, C, reduce, chunk, opts, D)
        E = self.d_inner
        scale = cache["norm.hook_scale"]  # [b, L, G]  1/rms of each norm group
        scale_e = scale.repeat_interleave(E // scale.shape[-1], dim=-1)  # [b, L, E]
        rows = self.norm.weight.detach().to(dt.dtype) * scale_e * cache["hook_gate"]  # [b, L, E]

        def block(reduce, chunk, opts, upto=None):  # upto: only the first positions (rows of a causal map)
            cut = (lambda v: v) if upto is None else (lambda v: implicit.prefix(v, upto))
            return implicit.ssd_block_map(cut(dt), A, cut(B), cut(C), self.D.detach().to(dt.dtype),
                                          cut(cache["hook_conv"][..., :E]), cut(rows), self.conv1d, self.head_dim,
                                          reduce, chunk, opts)

        if kind == "block":
            return block(reduce, chunk, opts)
        return implicit_output.OutputAttention([self.output_branch(block, opts, dt.dtype)], names=["layer"],
                                               n_pos=dt.shape[1], batch=dt.shape[0], rows=opts.rows, chunk=chunk)

    def output_branch(self, block, opts, f) -> implicit_output.OutputBranch:
        """This mixer's term of the output-space operator: W_out·diag(block map)·W_in with W_in the x
        rows of in_proj (after z), and their biases when opts.include_bias."""
        E = self.d_inner

        def maps(t0: int, t1: int):  # rows t0..t1−1 over the sources 0..t1−1 (causal: the rest is 0)
            return block(None, None, dataclasses.replace(opts, rows=(t0, t1)), upto=t1)

        w_in = self.in_proj.weight.detach()[E : 2 * E].to(f)  # z, then x of xBC
        with_bias = opts.include_bias
        b_in = self.in_proj.bias.detach()[E : 2 * E].to(f) if with_bias and self.in_proj.bias is not None else None
        b_out = self.out_proj.bias.detach().to(f) if with_bias and self.out_proj.bias is not None else None
        return implicit_output.OutputBranch(maps, w_in, self.out_proj.weight.detach().to(f), torch.ones((), dtype=f),
                                            b_in, b_out)


def ssd_unit(unit, h: Tensor, rec: Recurrence | None = None) -> tuple[Tensor, Tensor]:
    """The SSD unit of a Mamba-2 mixer (and of each branch of a Mamba-2-form Diff-S6 mixer, which has
    the same attributes and hooks): h [batch, pos, d] -> (y [batch, pos, E] = SSD(x, Δ, A, B, C) + D·x,
    gate [batch, pos, E] = SiLU(z)), before the gated norm; `rec` carries the unit's state."""
    b, L, _ = h.shape
    E, G, N, H, P = unit.d_inner, unit.n_groups, unit.d_state, unit.n_heads, unit.head_dim
    key, collect = unit.state_key, rec is not None and rec.collect
    conv_state, state = (rec.conv_in(key), rec.ssm_in(key)) if rec else (None, None)
    z, xBC, dt = unit.hook_in_proj(unit.in_proj(h)).split([E, unit.conv_dim, H], dim=-1)
    z, xBC = unit.hook_z(z), unit.hook_xBC(xBC)
    conv = causal_conv1d(xBC, unit.conv1d.weight, unit.conv1d.bias, initial_state=conv_state, return_final_state=collect)
    x, B, C = F.silu(unit.hook_conv(conv.out)).split([E, G * N, G * N], dim=-1)
    x = unit.hook_ssm_in(x.reshape(b, L, H, P))
    B = unit.hook_B(B.reshape(b, L, G, N))
    C = unit.hook_C(C.reshape(b, L, G, N))
    lo, hi = unit.time_step_limit
    dt = unit.hook_dt(F.softplus(dt + unit.dt_bias).clamp(lo, hi))  # [batch, pos, H]
    want = unit.wants_states()
    if state is not None and L == 1 and not want:  # decoding: h_t from h_{t−1}
        y, final = ssd_state_step(state, x[:, 0], dt[:, 0], unit.A(), B[:, 0], C[:, 0], unit.D, in_place=rec.in_place)
        y, unit.last_path = y[:, None], "step"
    else:
        res = ssd(x, dt, unit.A(), B, C, unit.D, chunk_size=unit.chunk_size, initial_state=state,
                  return_final_state=collect, return_states=want)
        y, states, final, unit.last_path = res.y, res.states, res.final_state, res.path
    if collect:
        rec.put(key, conv.final_state, final)
    if want:
        states = unit.hook_ssm_state(states)
        Ch = C.to(states.dtype).repeat_interleave(H // G, dim=2)  # [batch, pos, H, N]
        y = torch.einsum("blhpn,blhn->blhp", states, Ch) + unit.D.view(H, 1) * x.to(states.dtype)
        y = y.to(x.dtype)
    y = unit.hook_ssm_out(y)
    gate = unit.hook_gate(F.silu(z))
    return y.reshape(b, L, E), gate
