"""Implicit attention of (Diff-)Mamba layers, orchestrated: find the module a (layer, branch) names,
run one forward that caches only the hooks it needs, and let the module compute its own map
(`Mixer.implicit_attention`; the math is in `implicit.py`, definitions in docs/conventions.md).

Two kinds of map:
- ``kind="s6"``: the scan operator α as a tensor: [b, E, L, L] (Mamba-1, per channel) or
  [b, H, L, L] (Mamba-2, per head), with y_t − D·x_t = Σ_s α[t,s]·x_s.
- ``kind="block"``: the whole mixer up to out_proj as a map of the in_proj x path plus a bias, an
  :class:`ImplicitAttention` (``matrix`` [b, E, L, L], ``bias`` [b, E, L]) whose ``reconstruct(x)``
  gives hook_gated (Mamba-1), norm.hook_normalized (Mamba-2), or for Diff-S6 this branch's share
  of hook_gated.

With ``reduce`` ("mean" or "absmean" over channels/heads) the result is [b, L, L] (and the block
bias [b, L]), computed ``chunk`` channels at a time in O(b·chunk·L²) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..differential import Differential
from ..errors import DiffMambaError
from ..implicit import KINDS, REDUCES, ImplicitAttention
from ..mixers import Mixer
from ..scan import compute_dtype

__all__ = ["ImplicitAttention", "implicit_attention", "differential_attention", "KINDS", "REDUCES", "AttentionTarget",
           "attention_target", "differential_of"]

Tensor = torch.Tensor


@dataclass
class AttentionTarget:
    """The module whose implicit attention a (layer, branch) names: a plain `Mixer`, or a `Differential`
    module (a DiffBlock, or a Diff-S6 mixer) with the branch to read."""

    path: str  # module path, e.g. "blocks.3.mixer" or "blocks.2"
    module: Mixer
    branch: int | None

    def hooks(self, kind: str) -> list[str]:
        return [f"{self.path}.{n}" for n in self.module.attention_hooks(kind, self.branch)]

    def compute(self, cache: dict[str, Tensor], kind: str, reduce, chunk):
        prefix = f"{self.path}."
        local = {k[len(prefix):]: v for k, v in cache.items() if k.startswith(prefix)}
        return self.module.implicit_attention(local, kind, reduce, chunk, branch=self.branch)


def _check_layer(model, layer) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise DiffMambaError(f"expected a HookedMamba (with .blocks), got {type(model).__name__}")
    n = len(blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise DiffMambaError(f"layer {layer!r} is out of range: valid block indices are 0..{n - 1}")
    return blocks[layer]


def differential_of(block: nn.Module, layer: int) -> tuple[str, Differential] | None:
    """(path, module) of the differential part of block `layer` (the block itself, or its mixer), or None."""
    if isinstance(block, Differential):
        return f"blocks.{layer}", block
    mixer = getattr(block, "mixer", None)
    if isinstance(mixer, Differential):
        return f"blocks.{layer}.mixer", mixer
    return None


def attention_target(model, layer, branch) -> AttentionTarget:
    """The module that `layer`/`branch` name, with clear errors for a wrong branch."""
    block = _check_layer(model, layer)
    diff = differential_of(block, layer)
    if diff is not None:
        path, module = diff
        if branch not in (1, 2):
            raise DiffMambaError(
                f"layer {layer} is {module.DESCRIPTION} ({', '.join(module.BRANCHES)}): pass branch=1 or branch=2, got {branch!r}"
            )
        return AttentionTarget(path, module, branch)
    mixer = getattr(block, "mixer", None)
    if not isinstance(mixer, Mixer):
        raise DiffMambaError(f"layer {layer}: unsupported mixer type {type(mixer).__name__}")
    if branch is not None:
        raise DiffMambaError(f"layer {layer} is a plain (non-differential) layer: it has no branch {branch!r}; pass branch=None")
    return AttentionTarget(f"blocks.{layer}.mixer", mixer, None)


def _check_args(kind, reduce, chunk) -> None:
    if kind not in KINDS:
        raise DiffMambaError(f"unknown kind {kind!r}; expected 's6' or 'block'")
    if reduce not in REDUCES:
        raise DiffMambaError(f"unknown reduce {reduce!r}; expected None, 'mean' or 'absmean'")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise DiffMambaError(f"chunk must be a positive number of channels/heads or None, got {chunk!r}")


def _run(model, input_ids: Tensor, names: list[str]) -> dict[str, Tensor]:
    """One forward caching only `names`, converted to the compute dtype; a 1-D [pos] input is batch 1."""
    if isinstance(input_ids, Tensor) and input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    model.check_input_ids(input_ids)
    f = compute_dtype(model.dtype)
    with torch.no_grad():
        _, cache = model.run_with_cache(input_ids.to(model.device), names_filter=list(dict.fromkeys(names)), return_type=None)
    return {n: cache[n].to(f) for n in names}


@torch.no_grad()
def implicit_attention(model, input_ids: Tensor, layer: int, branch: int | None = None, kind: str = "s6",
                       reduce: str | None = None, chunk: int | None = None) -> Tensor | ImplicitAttention:
    """The implicit attention of block `layer` on `input_ids` [batch, pos].

    layer:  block index i of ``blocks.{i}`` (0..n_layers − 1).
    branch: 1 or 2 for a differential layer (mixer_1/mixer_2 of a Diff-Mamba-1/2 block, ssm_1/ssm_2
            of a Diff-S6 layer); None for a plain layer.
    kind:   "s6" -> α as a tensor; "block" -> an :class:`ImplicitAttention` (see the module docstring).
    reduce: None, "mean" or "absmean" over channels/heads -> [batch, pos, pos] (block bias [batch, pos]).
    chunk:  channels (heads for Mamba-2 "s6") per step; None picks one so that each work buffer is
            about 2^26 elements (256 MiB in float32).

    Row t, column s: how much position s feeds position t; exactly 0 above the diagonal. Computed
    in float32 (float64 for a float64 model) from one forward that caches only this block's hooks.
    """
    _check_args(kind, reduce, chunk)
    target = attention_target(model, layer, branch)
    return target.compute(_run(model, input_ids, target.hooks(kind)), kind, reduce, chunk)


@torch.no_grad()
def differential_attention(model, input_ids: Tensor, layer: int, kind: str = "s6", reduce: str | None = "mean",
                           chunk: int | None = None) -> Tensor | ImplicitAttention:
    """map₁ − λ·map₂ for a differential layer, λ the block's λ as used in the forward (hook_lambda).

    Diff-Mamba-1/2 branches have their own projections, so channels are not shared: each branch is
    first aggregated over its channels/heads with `reduce` ("mean" or "absmean"), then differenced
    -> [batch, pos, pos]. This is a summary picture, not the operator the block applies. Diff-S6
    branches share channels, so reduce=None is allowed there and gives the per-channel difference
    [batch, E, pos, pos]; with kind="block" that difference reconstructs the mixer's hook_gated
    exactly. Returns a tensor for kind="s6" and an :class:`ImplicitAttention` for kind="block".
    """
    _check_args(kind, reduce, chunk)
    block = _check_layer(model, layer)
    diff = differential_of(block, layer)
    if diff is None:
        raise DiffMambaError(
            f"layer {layer} is not a differential layer (arch {model.cfg.arch}); "
            f"differential layers: {list(model.cfg.diff_layer_indices) or 'none'}"
        )
    path, module = diff
    t1, t2 = AttentionTarget(path, module, 1), AttentionTarget(path, module, 2)
    if reduce is None and not module.SHARED_CHANNELS:
        raise DiffMambaError(
            "reduce=None is only defined for Diff-S6 layers: the two mixers of a Diff-Mamba block do not share "
            "channels, so aggregate each branch first (reduce='mean' or 'absmean')"
        )
    lam_name = f"{path}.hook_lambda"
    cache = _run(model, input_ids, t1.hooks(kind) + t2.hooks(kind) + [lam_name])
    lam = cache[lam_name]
    m1, m2 = t1.compute(cache, kind, reduce, chunk), t2.compute(cache, kind, reduce, chunk)
    return m1 - lam * m2 if kind == "s6" else m1.combine(m2, lam)
