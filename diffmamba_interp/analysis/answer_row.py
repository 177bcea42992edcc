"""The answer row: how much each source position s feeds one target position t (by default the last,
where the answer is read), for every map of one layer, from one forward and in O(L) memory per
channel (only row t is computed), so it runs at 16k tokens and more.

Maps (each a row over s, [batch, pos]; 0 for s > t):
- a plain layer: ``"layer"`` (the `kind` map, reduced over channels with `reduce`);
- a differential layer: ``"branch 1"``, ``"branch 2"`` (each branch's map reduced over its
  channels) and ``"differential"`` (map₁ − λ·map₂ of those: the summary picture, see
  `attention.differential_summary`);
- every layer, from the output-space operator O (kind "output"): ``"output norm"`` (‖O[t,s]‖_F) and,
  for a differential layer, ``"output norm, branch k"`` (the norm of branch k's term);
- with `answer` (token ids): ``"logit"``, uᵀ·O[t,s]·h_s with u the answer token's unembedding direction
  through norm_f with its scale frozen at t: how much source s pushes the answer's logit through this
  block's output (the direct path, as the branch lens), and ``"logit, branch k"`` per term.
  Σ_s logit[s] + `AnswerRow.logit_rest` = uᵀ·hook_mixer_out[t].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DiffMambaError
from ..implicit import MapOptions
from .attention import (
    AttentionTarget, _check_args, _check_layer, _run, attention_target, differential_of, row_window,
)

Tensor = torch.Tensor

__all__ = ["AnswerRow", "answer_row", "answer_rows", "answer_direction"]


@dataclass
class AnswerRow:
    """Rows of one layer at target `position`: name -> [batch, pos] (module docstring)."""

    layer: int
    position: int
    maps: dict[str, Tensor]
    logit_rest: Tensor | None = None  # [batch]: uᵀ·(bias terms at t), the part of the logit no source carries
    kind: str = "block"
    reduce: str = "mean"
    notes: list[str] = field(default_factory=list)


def answer_direction(model, cache: dict[str, Tensor], answer: Tensor, position: int) -> Tensor:
    """u [batch, d] = W_U[answer] ⊙ w_norm_f · (norm_f's 1/rms at `position`, frozen): the answer
    logit's gradient with respect to the final residual stream at that position."""
    f = cache["norm_f.hook_scale"].dtype
    W_U = model.lm_head.weight.detach().to(f)[answer]  # [b, d]
    return W_U * model.norm_f.weight.detach().to(f) * cache["norm_f.hook_scale"][:, position]


def _answer_ids(answer, batch: int, vocab: int) -> Tensor:
    a = torch.as_tensor(answer).flatten().long()
    if a.numel() == 1:
        a = a.expand(batch)
    if a.numel() != batch or int(a.min()) < 0 or int(a.max()) >= vocab:
        raise DiffMambaError(f"answer must be one token id in 0..{vocab - 1} or one per batch row ({batch}), got {answer!r}")
    return a


def _row(x) -> Tensor:
    m = x if isinstance(x, Tensor) else x.matrix  # [b, 1, L]
    return m[:, 0]


class _LayerRows:
    """The targets and hooks of one layer's answer row."""

    def __init__(self, model, layer: int, kind: str, answer: bool):
        block = _check_layer(model, layer)
        self.layer, self.diff = layer, differential_of(block, layer)
        if self.diff is not None:
            self.targets = {f"branch {k}": AttentionTarget(self.diff[0], self.diff[1], k) for k in (1, 2)}
        else:
            self.targets = {"layer": attention_target(model, layer, None)}
        self.whole = attention_target(model, layer, None, "output")
        names = [n for tg in self.targets.values() for n in tg.hooks(kind)] + self.whole.hooks("output")
        names.append(f"blocks.{layer}.norm.hook_normalized")
        if self.diff is not None:
            names.append(f"{self.diff[0]}.hook_lambda")
        self.names = names + (["norm_f.hook_scale"] if answer else [])

    def compute(self, model, cache, kind, reduce, chunk, opts, answer) -> AnswerRow:
        t0 = opts.rows[0]
        maps = {name: _row(tg.compute(cache, kind, reduce, chunk, opts)) for name, tg in self.targets.items()}
        if self.diff is not None:
            maps["differential"] = maps["branch 1"] - cache[f"{self.diff[0]}.hook_lambda"] * maps["branch 2"]
        op = self.whole.compute(cache, "output", None, None, opts)
        h = cache[f"blocks.{self.layer}.norm.hook_normalized"]
        u = None
        if answer is not None:
            u = answer_direction(model, cache, _answer_ids(answer, h.shape[0], model.cfg.vocab_size).to(h.device), t0)
        s = op.summaries(norm=True, h=h if u is not None else None, direction=u)
        maps["output norm"] = s.norm[:, 0]
        several = len(op.branches) > 1
        if several:
            for name, nk in zip(op.names, s.norm_branches):
                maps[f"output norm, {name}"] = nk[:, 0]
        rest = None
        if u is not None:
            maps["logit"] = s.contrib[:, 0]
            if several:
                for name, ck in zip(op.names, s.contrib_branches):
                    maps[f"logit, {name}"] = ck[:, 0]
            rest = s.contrib_bias[:, 0]
        return AnswerRow(self.layer, t0, maps, rest, kind, reduce)


@torch.no_grad()
def answer_rows(model, input_ids: Tensor, layers=None, *, position: int = -1, kind: str = "block",
                reduce: str = "mean", answer=None, include_D: bool | None = None, include_bias: bool = True,
                chunk: int | None = None) -> dict[int, AnswerRow]:
    """`answer_row` of several blocks (None: all) from one forward: {layer: AnswerRow}."""
    if kind not in ("s6", "block"):
        raise DiffMambaError(f"answer_row kind must be 's6' or 'block' (the output-space rows are always included), got {kind!r}")
    if reduce not in ("mean", "absmean"):
        raise DiffMambaError(f"answer_row needs a reduce over channels, 'mean' or 'absmean', got {reduce!r}")
    _check_args(kind, reduce, chunk)
    if isinstance(input_ids, Tensor) and input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    L = input_ids.shape[-1] if isinstance(input_ids, Tensor) else 0
    if isinstance(position, bool) or not isinstance(position, int):
        raise DiffMambaError(f"position must be an int, got {position!r}")
    _check_layer(model, 0)
    layers = list(range(len(model.blocks))) if layers is None else list(layers)
    parts = [_LayerRows(model, layer, kind, answer is not None) for layer in layers]
    t0, _ = row_window(position, L)
    opts = MapOptions(rows=(t0, t0 + 1), include_D=include_D, include_bias=include_bias)
    cache = _run(model, input_ids, [n for p in parts for n in p.names])
    return {p.layer: p.compute(model, cache, kind, reduce, chunk, opts, answer) for p in parts}


def answer_row(model, input_ids: Tensor, layer: int, *, position: int = -1, kind: str = "block", reduce: str = "mean",
               answer=None, include_D: bool | None = None, include_bias: bool = True,
               chunk: int | None = None) -> AnswerRow:
    """Every map's row at target `position` (default −1, the answer position) of block `layer` on
    `input_ids` [batch, pos] (or [pos]); see the module docstring. kind: "s6" or "block" for the
    per-branch maps, reduced with `reduce` ("mean" or "absmean"); answer: a token id (or one per
    batch row) for the logit rows. One forward caches this block's hooks (and norm_f's scale)."""
    _check_layer(model, layer)
    return answer_rows(model, input_ids, [layer], position=position, kind=kind, reduce=reduce, answer=answer,
                       include_D=include_D, include_bias=include_bias, chunk=chunk)[layer]
