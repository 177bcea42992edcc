"""What every mixer is: `MixerDims` (the sizes it is built with), the `ScanUnit` protocol (a module
that runs one selective scan) and the `Mixer` protocol (what a block holds and analysis talks to).

Dimension letters (docs/conventions.md): d = d_model, E = d_inner, N = d_state, K = d_conv,
H = heads, P = head_dim (E = H·P), G = n_groups, R = dt_rank, L = pos.

A new architecture adds one mixer file that implements `Mixer` (and `ScanUnit` for its scan) and
one entry in `archs.ARCHS`; the analysis code asks the mixer, never its attributes by name:
- `A()`: the state matrix A = −exp(A_log) in the scan's compute dtype;
- `SCAN_HOOKS`: the hooks of its scan inputs and outputs (Δ, B, C, x, h, y), relative names;
- `state_shapes()` and a `forward(h, rec)` that reads its initial state from a `state.Recurrence`
  and writes its final one (recurrent mode: chunked prefill, decoding, state patching);
- `attention_hooks(kind, branch)` / `implicit_attention(cache, kind, ...)`: the hooks its
  implicit-attention map needs and the map itself, computed from a cache of those hooks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from ..scan import compute_dtype

Tensor = torch.Tensor


@dataclass
class MixerDims:
    """The sizes one mixer is built with (a differential block's mixers get smaller ones, see archs.py)."""

    d_model: int
    d_inner: int  # E
    d_state: int  # N
    d_conv: int  # K
    dt_rank: int  # R (Mamba-1)
    head_dim: int  # P (Mamba-2)
    n_groups: int  # G (Mamba-2)
    conv_bias: bool
    bias: bool
    norm_eps: float
    chunk_size: int
    time_step_limit: tuple[float, float]

    @property
    def n_heads(self) -> int:  # H
        return self.d_inner // self.head_dim


def is_hooked(hp: HookPoint) -> bool:
    """Whether a forward hook is attached to `hp` (TransformerLens or plain torch hooks)."""
    return bool(hp._forward_hooks)


def init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> Tensor:
    """softplus⁻¹ of Δ drawn log-uniformly in [dt_min, dt_max] (mamba-ssm's init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class ScanUnit(nn.Module):
    """A module that runs one selective scan: a Mamba-1 or Mamba-2 mixer, or one branch of Diff-S6.

    `HookedMamba.mixers()` lists these by module path; `capture_states` makes the scan materialise
    `hook_ssm_state` without a hook (for nnsight); `last_path` says which scan implementation ran.
    """

    # role -> relative hook name: Δ, B, C, the scanned input x, the state h and the output y (+ D·x)
    SCAN_HOOKS = {"dt": "hook_dt", "B": "hook_B", "C": "hook_C", "x": "hook_ssm_in", "state": "hook_ssm_state",
                  "y": "hook_ssm_out"}

    capture_states: bool
    last_path: str
    state_key: str | None = None  # this unit's module path, the key of its entry in a `ModelState` (set by HookedMamba)
    conv_group: str | None = None  # units of one conv (the cores of a Mamba-1-form Diff-S6 mixer) share a conv state

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per batch row: the shape of the conv state and of the SSM state (`state.MixerState`)."""
        raise NotImplementedError

    def A(self) -> Tensor:
        """A = −exp(A_log) ([E, N] for S6, [H] for SSD) in float32 (float64 in a float64 model)."""
        return -torch.exp(self.A_log.to(compute_dtype(self.A_log.dtype)))

    def wants_states(self) -> bool:
        """Whether this forward must materialise the per-position states."""
        return self.capture_states or is_hooked(self.hook_ssm_state)


class Mixer(ABC):
    """The protocol of what a block holds as its `mixer` (or its two `mixer_k` branches).

    Also implemented by a differential block (`blocks.DiffBlock`), whose `branch` argument picks
    mixer_1 or mixer_2. `cache` maps hook names relative to this module to tensors in the compute
    dtype; the result is a tensor (kind "s6"), an `implicit.ImplicitAttention` (kind "block") or an
    `implicit_output.OutputAttention` (kind "output": the whole block in its output space; for a
    differential module branch None means both branches). `opts` is an `implicit.MapOptions`
    (target rows, include_D, include_bias) or None for the defaults.
    """

    @abstractmethod
    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        """The hooks (relative to this module) that `implicit_attention` reads for this kind."""

    @abstractmethod
    def implicit_attention(self, cache: Mapping[str, Tensor], kind: str, reduce=None, chunk: int | None = None,
                           branch: int | None = None, opts=None):
        """This mixer's implicit attention from a cache of `attention_hooks(kind, branch)`."""
