"""Implicit attention of (Diff-)Mamba layers, orchestrated: find the module a (layer, branch) names,
run one forward that caches only the hooks it needs, and let the module compute its own map
(`Mixer.implicit_attention`; the math is in `implicit.py`, definitions in docs/conventions.md).

Three kinds of map:
- ``kind="s6"``: the scan operator α as a tensor: [b, E, L, L] (Mamba-1, per channel) or
  [b, H, L, L] (Mamba-2, per head), with y_t − D·x_t = Σ_s α[t,s]·x_s (α + diag(D) with include_D).
- ``kind="block"``: the whole mixer up to out_proj as a map of the in_proj x path plus a bias, an
  :class:`ImplicitAttention` (``matrix`` [b, E, L, L], ``bias`` [b, E, L]) whose ``reconstruct(x)``
  gives hook_gated (Mamba-1), norm.hook_normalized (Mamba-2), or for Diff-S6 this branch's share
  of hook_gated (Mamba-1 form) or of out_proj's input (Mamba-2 form). ``include_D=False,
  include_bias=False`` is the matrix Zimerman et al. draw (`paper_form`); `minmax_abs` is their |·|
  with min-max normalisation.
- ``kind="output"``: the operator the whole block applies, in its d-dimensional output space, to
  its normed input h (`blocks.i.norm.hook_normalized`): an :class:`OutputAttention` whose
  ``reconstruct(h)`` is the block's ``hook_mixer_out``; for a differential block this is where
  Diff-Mamba subtracts (branch None: the whole operator; 1 or 2: one branch's term). It offers
  ``frobenius()`` (‖O[t,s]‖_F), ``project(u, h)`` and ``dense()`` (small models).

With ``reduce`` ("mean" or "absmean" over channels/heads) the result is [b, L, L] (and the block
bias [b, L]), computed ``chunk`` channels at a time in O(b·chunk·L²) memory. ``rows`` restricts the
map to target rows (an int such as −1 for the answer row, or (a, b)): O(L) per channel per row.

`differential_summary` (old name `differential_attention`) is the picture map₁ − λ·map₂ of the
branches' channel averages; the operator the block applies is kind "output".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..differential import Differential
from ..errors import DiffMambaError
from ..implicit import KINDS, REDUCES, ImplicitAttention, MapOptions, minmax_abs
from ..implicit_output import OutputAttention
from ..mixers import Mixer
from ..scan import compute_dtype

__all__ = ["ImplicitAttention", "OutputAttention", "implicit_attention", "differential_summary", "differential_attention",
           "paper_form", "minmax_abs", "KINDS", "REDUCES", "AttentionTarget", "attention_target", "differential_of",
           "row_window"]

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

    def compute(self, cache: dict[str, Tensor], kind: str, reduce, chunk, opts: MapOptions | None = None):
        prefix = f"{self.path}."
        local = {k[len(prefix):]: v for k, v in cache.items() if k.startswith(prefix)}
        return self.module.implicit_attention(local, kind, reduce, chunk, branch=self.branch, opts=opts)


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


def attention_target(model, layer, branch, kind: str = "s6") -> AttentionTarget:
    """The module that `layer`/`branch` name, with clear errors for a wrong branch. For kind "output"
    a differential module is also named whole (branch None)."""
    block = _check_layer(model, layer)
    diff = differential_of(block, layer)
    if diff is not None:
        path, module = diff
        if kind == "output" and branch is None:
            return AttentionTarget(path, module, None)
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
        raise DiffMambaError(f"unknown kind {kind!r}; expected 's6', 'block' or 'output'")
    if reduce not in REDUCES:
        raise DiffMambaError(f"unknown reduce {reduce!r}; expected None, 'mean' or 'absmean'")
    if kind == "output" and reduce is not None:
        raise DiffMambaError("kind 'output' is not reduced over channels (it lives in the d-dim output space): "
                             "pass reduce=None and use .frobenius() or .project(u, h)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise DiffMambaError(f"chunk must be a positive number of channels/heads (target rows for kind 'output') "
                             f"or None, got {chunk!r}")


def row_window(rows, L: int) -> tuple[int, int] | None:
    """rows -> (t0, t1) with 0 <= t0 < t1 <= L: None (all rows, returned as None), an int t (−1 is the
    last position), a pair (a, b) or a slice a:b (None ends allowed, negative counted from L)."""
    if rows is None:
        return None
    if isinstance(rows, bool):
        raise DiffMambaError(f"rows must be None, a position, (start, stop) or a slice, got {rows!r}")
    if isinstance(rows, int):
        t = rows + L if rows < 0 else rows
        if not 0 <= t < L:
            raise DiffMambaError(f"row {rows} is out of range for {L} positions")
        return t, t + 1
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise DiffMambaError(f"rows {rows!r}: a step is not supported")
        rows = (rows.start, rows.stop)
    if not isinstance(rows, (tuple, list)) or len(rows) != 2 or not all(
            r is None or (isinstance(r, int) and not isinstance(r, bool)) for r in rows):
        raise DiffMambaError(f"rows must be None, a position, (start, stop) or a slice, got {rows!r}")
    a, b = (0 if rows[0] is None else rows[0]), (L if rows[1] is None else rows[1])
    a, b = (a + L if a < 0 else a), (b + L if b < 0 else b)
    if not 0 <= a < b <= L:
        raise DiffMambaError(f"rows {tuple(rows)} do not name a non-empty window of positions 0..{L - 1}")
    return a, b


def _options(input_ids, rows, include_D, include_bias) -> MapOptions:
    L = input_ids.shape[-1] if isinstance(input_ids, Tensor) else 0
    if include_D not in (None, True, False) or include_bias not in (True, False):
        raise DiffMambaError(f"include_D must be None/True/False and include_bias True/False, got {include_D!r}, {include_bias!r}")
    return MapOptions(rows=row_window(rows, L), include_D=include_D, include_bias=include_bias)


def _run(model, input_ids: Tensor, names: list[str]) -> dict[str, Tensor]:
    """One forward caching only `names`, converted to the compute dtype; a 1-D [pos] input is batch 1."""
    if isinstance(input_ids, Tensor) and input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    model.check_input_ids(input_ids)
    f = compute_dtype(model.dtype)
    with torch.no_grad():
        # the forward stops before norm_f unless a hook of norm_f is asked for (return_type None skips it)
        needs_head = any(n.startswith("norm_f.") for n in names)
        _, cache = model.run_with_cache(input_ids.to(model.device), names_filter=list(dict.fromkeys(names)),
                                        return_type="logits" if needs_head else None)
    return {n: cache[n].to(f) for n in names}


@torch.no_grad()
def implicit_attention(model, input_ids: Tensor, layer: int, branch: int | None = None, kind: str = "s6",
                       reduce: str | None = None, chunk: int | None = None, *, rows=None, include_D: bool | None = None,
                       include_bias: bool = True) -> Tensor | ImplicitAttention | OutputAttention:
    """The implicit attention of block `layer` on `input_ids` [batch, pos].

    layer:  block index i of ``blocks.{i}`` (0..n_layers − 1).
    branch: 1 or 2 for a differential layer (mixer_1/mixer_2 of a Diff-Mamba-1/2 block, ssm_1/ssm_2
            of a Diff-S6 layer); None for a plain layer, and for kind "output" the whole block.
    kind:   "s6" -> α as a tensor; "block" -> an :class:`ImplicitAttention`; "output" -> an
            :class:`OutputAttention` (see the module docstring).
    reduce: None, "mean" or "absmean" over channels/heads -> [batch, pos, pos] (block bias [batch, pos]).
    chunk:  channels (heads for Mamba-2 "s6") per step; None picks one so that each work buffer is
            about 2^26 elements (256 MiB in float32). For kind "output": target rows per step.
    rows:   None (every target t), an int (−1: the answer row), (a, b) or a slice: only those
            target rows are computed, [.., T, pos]; O(pos) per channel and row.
    include_D: the skip term diag(D) (default: False for "s6", where α excludes it, True otherwise).
    include_bias: the conv-bias term of "block" (for "output" also the in_proj/out_proj biases).

    Row t, column s: how much position s feeds position t; exactly 0 above the diagonal. Computed
    in float32 (float64 for a float64 model) from one forward that caches only this block's hooks.
    """
    _check_args(kind, reduce, chunk)
    opts = _options(input_ids, rows, include_D, include_bias)
    target = attention_target(model, layer, branch, kind)
    return target.compute(_run(model, input_ids, target.hooks(kind)), kind, reduce, chunk, opts)


def paper_form(model, input_ids: Tensor, layer: int, branch: int | None = None, reduce: str | None = None,
               chunk: int | None = None, *, rows=None) -> ImplicitAttention:
    """The whole-mixer matrix as Zimerman et al.'s code builds it: gate·α·diag(σ(v))·M, without D and
    without the conv-bias term (`implicit_attention(kind="block", include_D=False, include_bias=False)`).
    Its reconstruct(x) is the mixer's output minus the D term and the bias term. Draw it as they do
    with `minmax_abs(matrix)` (|·|, then min-max per map)."""
    return implicit_attention(model, input_ids, layer, branch, kind="block", reduce=reduce, chunk=chunk, rows=rows,
                              include_D=False, include_bias=False)


@torch.no_grad()
def differential_summary(model, input_ids: Tensor, layer: int, kind: str = "s6", reduce: str | None = "mean",
                         chunk: int | None = None, *, rows=None, include_D: bool | None = None,
                         include_bias: bool = True) -> Tensor | ImplicitAttention:
    """A summary picture of a differential layer: map₁ − λ·map₂ of the branches' channel averages,
    λ the block's λ as used in the forward (hook_lambda). (Also available as `differential_attention`.)

    Diff-Mamba-1/2 branches have their own projections, so channels are not shared: each branch is
    first aggregated over its channels/heads with `reduce` ("mean" or "absmean"), then differenced
    -> [batch, pos, pos]. The two branches' channel bases are unrelated and out_proj, subln and
    (1 − λ_init) are left out, so this is a picture, not the operator the block applies, and "noise
    cancelled" in it is no evidence: the operator is ``implicit_attention(kind="output")``. The two
    S6 cores of a Diff-S6 layer of the Mamba-1 form share channels (and λ is 1), so reduce=None is
    allowed there and gives the per-channel difference [batch, E, pos, pos]; with kind="block" that
    difference reconstructs the mixer's hook_gated exactly. (Diff-S6's Mamba-2 form has in_proj1 and
    in_proj2: no shared channels.) Returns a tensor for kind="s6" and an :class:`ImplicitAttention`
    for kind="block".
    rows, include_D, include_bias: as in `implicit_attention`.
    """
    if kind == "output":
        raise DiffMambaError("the differential summary is a picture of channel averages; the block's operator is "
                             "implicit_attention(..., kind='output') (branch None: both branches)")
    _check_args(kind, reduce, chunk)
    opts = _options(input_ids, rows, include_D, include_bias)
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
            f"reduce=None is only defined for Diff-S6 layers of the Mamba-1 form: the two branches of "
            f"{module.DESCRIPTION} do not share channels, so aggregate each branch first (reduce='mean' or 'absmean')"
        )
    lam_name = f"{path}.hook_lambda"
    cache = _run(model, input_ids, t1.hooks(kind) + t2.hooks(kind) + [lam_name])
    lam = cache[lam_name]
    m1, m2 = t1.compute(cache, kind, reduce, chunk, opts), t2.compute(cache, kind, reduce, chunk, opts)
    return m1 - lam * m2 if kind == "s6" else m1.combine(m2, lam)


differential_attention = differential_summary  # the old name
