"""Activation, state and attribution patching over layers × positions.

A clean and a corrupted prompt of the same length; a metric of the last position's logits
(`logit_diff(answer, wrong)` or `answer_prob(answer)`). Each cell of the grid is the metric of the
corrupted run with one thing at one position taken from the clean run:

- exact activation patching (`what` "resid", "mixer", "branch" or any hook name with `{layer}`):
  that hook's value at that position replaced by the clean run's. Cells run in batches, one row per
  patched position, starting at the block that holds the hook (the blocks before it are the
  corrupted run's, read from its cache) and at the batch's first patched position (positions before
  it are unchanged: the corrupted run's recurrent state there is carried in), and only the last
  position is unembedded. Equal to TransformerLens's `get_act_patch_*` loop (tests).
- state patching (`what="state"`): the SSM state of one scan unit (a mixer, each branch of a
  differential block, each core of a Diff-S6 mixer) after position p replaced by the clean run's
  and the recurrence continued from it (`recurrent.patch_state`), batched over units, reusing the
  corrupted prefix state instead of re-running the prefix.
- attribution patching (`method="attribution"`): the first-order estimate
  (clean − corrupted activation) · ∂metric/∂activation, summed over the hook's features, from one
  clean forward and one corrupted forward and backward for the whole grid. Exact where the
  metric is linear in the activation (tests); not available for states (the gradient of
  `hook_ssm_state` covers only each position's readout, not the recurrence).

Under torchrun (`distributed.py`) the exact and state grids are sharded by forward pass: each rank
runs its share of the tail runs (a batch of patched cells from one block on), dealt by their cost,
while every rank carries the cheap prefix state itself; the values are gathered on every rank. Each
cell is computed as one process computes it, so the grid does not depend on the number of ranks.
Attribution (one forward and one backward for the whole grid) runs whole on every rank.

`patch(...)` returns a `PatchingResult`: a DataFrame (component, layer, hook, position, token,
value, normalized = (value − corrupted) / (clean − corrupted)), both baselines and `figure()`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..differential import Differential
from ..distributed import gather_rows, is_main, shard
from ..errors import DiffMambaError
from ..recurrent import check_chunk_size, collect, normalize_positions, prefill
from ..state import MixerState, ModelState, Recurrence
from .inputs import encode_prompts, first_token, unknown_tokens_once

__all__ = ["WHATS", "METHODS", "PatchingResult", "patch", "logit_diff", "answer_prob"]

Tensor = torch.Tensor
Metric = Callable[[Tensor], Tensor]  # logits at the last position [rows, V] -> [rows]

WHATS = ("resid", "mixer", "branch", "state")
METHODS = ("exact", "attribution")


def logit_diff(answer: int, wrong: int) -> Metric:
    """logit[answer] − logit[wrong] at the last position."""
    def metric(logits: Tensor) -> Tensor:
        return logits[:, answer] - logits[:, wrong]
    metric.label = "logit difference"
    return metric


def answer_prob(answer: int) -> Metric:
    """softmax(logits)[answer] at the last position."""
    def metric(logits: Tensor) -> Tensor:
        return logits.float().softmax(-1)[:, answer]
    metric.label = "answer probability"
    return metric


@dataclass
class _Cell:
    """One row of the grid: a hook (or, for state patching, a scan unit), its block and component."""

    name: str  # hook name, or the scan unit's state key
    layer: int  # block index (-1: the embedding; n_layers: the final norm)
    component: str


@dataclass
class PatchingResult:
    """The grid of one patching run (see the module docstring)."""

    frame: pd.DataFrame
    what: str
    method: str
    metric: str
    clean_metric: float
    corrupt_metric: float
    tokens: list[str] = field(default_factory=list)

    def grid(self, column: str = "value") -> pd.DataFrame:
        """Rows "block i · component", columns positions."""
        df = self.frame.assign(row=_row_labels(self.frame))
        return df.pivot_table(index="row", columns="position", values=column, sort=False)

    def figure(self):
        from ..report.figures import patching_figure

        return patching_figure(self)


def _row_labels(df: pd.DataFrame) -> pd.Series:
    return df["layer"].map(lambda i: "embed" if i < 0 else f"block {i}") + " · " + df["component"]


# -- what is patched ------------------------------------------------------------------------------
def _block_of(name: str, n_layers: int) -> int:
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    if name == "hook_embed":
        return -1
    if name.startswith("norm_f."):
        return n_layers
    raise DiffMambaError(f"cannot patch {name!r}: only hooks of the blocks, hook_embed and norm_f are patched by position")


def _cells(model, what: str, layers) -> list[_Cell]:
    n = model.cfg.n_layers
    if what == "resid":
        cells = [_Cell(f"blocks.{i}.hook_resid_pre", i, "resid_pre") for i in range(n)]
    elif what == "mixer":
        cells = [_Cell(f"blocks.{i}.hook_mixer_out", i, "mixer_out") for i in range(n)]
    elif what == "branch":
        cells = [_Cell(f"{path}.{b}.{m.BRANCH_OUTPUT}", _block_of(path + ".", n), b)
                 for path, m in model.named_modules() if isinstance(m, Differential) for b in m.BRANCHES]
        if not cells:
            raise DiffMambaError("what='branch' needs differential layers; this model has none (use resid or mixer)")
    elif what == "state":
        cells = [_Cell(key, _block_of(key + ".", n), key.split(".", 2)[2]) for key, _ in model.mixers()]
    elif "{layer}" in what:
        cells = [_Cell(what.format(layer=i), i, what.split("{layer}.", 1)[-1].removeprefix("hook_")) for i in range(n)]
    elif what in model.hook_dict:
        cells = [_Cell(what, _block_of(what, n), what.rsplit(".", 1)[-1].removeprefix("hook_"))]
    else:
        raise DiffMambaError(f"unknown what {what!r}: one of {', '.join(WHATS)}, a hook name, or a hook name with "
                             "{layer} (e.g. 'blocks.{layer}.mixer.hook_dt')")
    if what != "state":
        for c in cells:
            if c.name not in model.hook_dict:
                raise DiffMambaError(f"no hook {c.name!r} in this model")
            if c.name.endswith("hook_ssm_state"):
                raise DiffMambaError("hook_ssm_state changes only each position's readout; patch states with what='state'")
            if c.name.endswith("hook_lambda"):
                raise DiffMambaError("λ (hook_lambda) is a parameter, the same in the clean and corrupted runs: patching "
                                     "it changes nothing; set it with a hook (run_with_hooks) to ablate the subtraction")
    if layers is not None:
        want = {int(i) for i in layers}
        bad = sorted(want - set(range(n)))
        if bad:
            raise DiffMambaError(f"layers {bad} out of range for {n} blocks")
        cells = [c for c in cells if c.layer in want]
        if not cells:
            raise DiffMambaError(f"no {what} cells in layers {sorted(want)}")
    return cells


# -- running the tail of the model ----------------------------------------------------------------
def _resid_in(layer: int, n_layers: int) -> str:
    """The hook holding the residual that block `layer` reads (the final residual for layer n_layers)."""
    if layer <= 0:
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _last_logits(model, resid: Tensor, start: int, state, full_unembed: bool = False) -> Tensor:
    """Blocks start.. on resid [rows, pos, d] from `state` (positions before it), then the logits at the last position."""
    rec = Recurrence(state, False) if state is not None else None
    for block in model.blocks[max(start, 0):]:
        resid = block(resid, rec)
    if full_unembed:  # a norm_f hook is patched: it must see every position
        return model.unembed(resid)[:, -1]
    return model.unembed(resid[:, -1])


def _groups(positions: list[int], size: int) -> list[list[int]]:
    ps = sorted(set(positions))
    return [ps[i:i + size] for i in range(0, len(ps), size)]


def _advance(model, ids: Tensor, state, a: int, b: int, chunk: int):
    """The state after ids[:, :b], from the state after ids[:, :a] (None: before any token)."""
    if b <= a:
        return state
    _, st = collect(model, ids[:, a:b], [], chunk_size=chunk, state=state, return_state=True)
    return st


def _values(model, ids: Tensor, names, chunk: int) -> dict[str, Tensor]:
    """Every hook of `names` and the final residual at every position, from one run; norm_f's hooks
    (which a logits-free run never fires) from norm_f applied to the final residual."""
    final = _resid_in(model.cfg.n_layers, model.cfg.n_layers)
    inner = {n for n in names if not n.startswith("norm_f.")}
    outer = set(names) - inner
    out = collect(model, ids, inner | {final}, chunk_size=chunk)
    if outer:
        with torch.no_grad(), model.hooks(fwd_hooks=[(lambda n: n in outer, lambda t, hook: out.update({hook.name: t}))]):
            model.norm_f(out[final].to(model.norm_f.weight.dtype))
    return out


def _baseline(model, vals: dict[str, Tensor], metric) -> float:
    """The metric of the run whose final residual `vals` holds (from `_values`)."""
    final = vals[_resid_in(model.cfg.n_layers, model.cfg.n_layers)]
    with torch.no_grad():
        return float(metric(model.unembed(final[:, -1]))[0])


def _exact(model, clean: Tensor, corrupt: Tensor, cells, positions, metric, batch_size, chunk, bar) -> dict:
    n = model.cfg.n_layers
    names = sorted({c.name for c in cells})
    starts = sorted({c.layer for c in cells})
    clean_vals = _values(model, clean, names, chunk)
    entry = _values(model, corrupt, {_resid_in(s, n) for s in starts}, chunk)
    L, groups = corrupt.shape[1], _groups(positions, batch_size)
    tasks = [(g, c) for g in range(len(groups)) for c in range(len(cells))]  # one tail run each
    cost = [len(groups[g]) * (L - groups[g][0]) * (n + 1 - max(cells[c].layer, 0)) for g, c in tasks]
    mine = {tasks[t] for t in shard(len(tasks), cost)}  # under torchrun: this rank's runs (all in one process)
    bar.total = sum(len(groups[g]) for g, _ in mine)  # this rank's cells
    out, state, at = {}, None, 0
    for g, group in enumerate(groups):
        s = group[0]
        state = _advance(model, corrupt, state, at, s, chunk)  # on every rank: the state is carried
        at = s
        R = len(group)
        rows = torch.arange(R)
        local = torch.tensor(group) - s
        st = state.select([0] * R) if state is not None else None
        for c, cell in enumerate(cells):
            if (g, c) not in mine:
                continue
            value = clean_vals[cell.name][0, group]  # [R, ...]

            def put(t, hook, value=value):
                t = t.clone()
                t[rows, local] = value.to(t.dtype)
                return t

            x = entry[_resid_in(cell.layer, n)][:, s:].expand(R, -1, -1)
            if cell.name == "hook_embed":
                x = put(x, None)
            with torch.no_grad(), model.hooks(fwd_hooks=[] if cell.name == "hook_embed" else [(cell.name, put)]):
                vals = metric(_last_logits(model, x, cell.layer, st, full_unembed=cell.layer == n))
            for p, v in zip(group, vals.tolist()):
                out[(cell.name, p)] = v
            bar.update(R)
    return out, _baseline(model, clean_vals, metric), _baseline(model, entry, metric)


def _state(model, clean: Tensor, corrupt: Tensor, cells, positions, metric, batch_size, chunk, conv, bar):
    """Per position p and block: the block's scan units as rows, each with its clean state after p,
    run over positions p+1.. from that block on (the blocks before it and the corrupted prefix are
    unchanged by the patch: their residual is read from the corrupted run, the prefix is the state)."""
    n, L = model.cfg.n_layers, corrupt.shape[1]
    layers = sorted({c.layer for c in cells})
    entry = _values(model, corrupt, {_resid_in(i, n) for i in layers}, chunk)
    corrupt_metric = _baseline(model, entry, metric)
    with torch.no_grad():
        clean_metric = float(metric(prefill(model, clean, chunk_size=chunk)[0])[0])
    units = [k for k, _ in model.mixers()]
    here = {layer: [c for c in cells if c.layer == layer] for layer in layers}
    ps = sorted(set(positions))
    tasks = [(p, layer, k) for p in ps if p < L - 1 for layer in layers for k in range(0, len(here[layer]), batch_size)]
    cost = [len(here[layer][k:k + batch_size]) * (L - 1 - p) * (n + 1 - layer) for p, layer, k in tasks]
    mine = {tasks[t] for t in shard(len(tasks), cost)}  # under torchrun: this rank's tail runs (all in one process)
    bar.total = sum(len(here[layer][k:k + batch_size]) for _, layer, k in mine) + len(cells) * (L - 1 in ps)
    out, st_clean, st_corrupt, at = {}, None, None, 0
    for p in ps:
        st_clean = _advance(model, clean, st_clean, at, p + 1, chunk)
        st_corrupt = _advance(model, corrupt, st_corrupt, at, p + 1, chunk)
        at = p + 1
        if p == L - 1:  # a state after the last position reaches no logit
            for cell in cells:
                out[(cell.name, p)] = corrupt_metric
            bar.update(len(cells))
            continue
        for layer in layers:
            later = [k for k in units if _block_of(k + ".", n) >= layer]
            for k in range(0, len(here[layer]), batch_size):
                if (p, layer, k) not in mine:
                    continue
                part = here[layer][k:k + batch_size]
                R = len(part)
                # the corrupted state as views (never copied; a forward does not modify its state)
                st = ModelState({key: MixerState(st_corrupt.entries[key].conv.expand(R, *st_corrupt.entries[key].conv.shape[1:]),
                                                 st_corrupt.entries[key].ssm.expand(R, *st_corrupt.entries[key].ssm.shape[1:]))
                                 for key in later}, st_corrupt.seen)
                fresh: dict[int, Tensor] = {}  # id of a corrupted conv -> its patched copy (shared ones stay shared)
                for r, cell in enumerate(part):
                    e, c = st_corrupt.entries[cell.name], st_clean.entries[cell.name]
                    ssm = st.entries[cell.name].ssm.clone()
                    ssm[r] = c.ssm[0]
                    st.entries[cell.name] = MixerState(st.entries[cell.name].conv, ssm)
                    if conv:
                        fresh.setdefault(id(e.conv), e.conv.expand(R, *e.conv.shape[1:]).clone())[r] = c.conv[0]
                for key in later:  # the two cores of a Diff-S6 mixer read one conv tensor
                    if id(st_corrupt.entries[key].conv) in fresh:
                        st.entries[key] = MixerState(fresh[id(st_corrupt.entries[key].conv)], st.entries[key].ssm)
                x = entry[_resid_in(layer, n)][:, p + 1:].expand(R, -1, -1)
                with torch.no_grad():
                    vals = metric(_last_logits(model, x, layer, st))
                for cell, v in zip(part, vals.tolist()):
                    out[(cell.name, p)] = v
                bar.update(R)
    return out, clean_metric, corrupt_metric


def _attribution(model, clean: Tensor, corrupt: Tensor, cells, positions, metric, chunk) -> dict:
    """(clean − corrupted value) · ∂metric/∂value per hook and position. The gradient is taken block by
    block from the top (the corrupted run's block inputs kept from a gradient-free run, each block
    re-run with autograd on its own), so memory holds one block's graph, not the model's."""
    n = model.cfg.n_layers
    names = sorted({c.name for c in cells})
    clean_vals = _values(model, clean, names, chunk)
    inputs = corrupt_vals = _values(model, corrupt, set(names) | {_resid_in(i, n) for i in range(n + 1)}, chunk)
    corrupt_metric = _baseline(model, corrupt_vals, metric)
    leaves: dict[str, Tensor] = {}

    def tap(t, hook):  # t + a zero leaf: its gradient is the activation's, the flow through t is kept
        leaves[hook.name] = torch.zeros_like(t, requires_grad=True)
        return t + leaves[hook.name]

    def grad_into(x: Tensor, run, hooks: list[str], g: Tensor | None) -> Tensor:
        """x -> run(x) with `hooks` tapped; backpropagate g (or the output itself, a scalar) -> ∂/∂x."""
        x = x.detach().requires_grad_(True)
        with model.hooks(fwd_hooks=[(lambda nm: nm in hooks, tap)]):
            out = run(x)
        (out.sum() if g is None else (out * g.to(out.dtype)).sum()).backward()
        return x.grad

    weights = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in weights:  # gradients of activations only; the weights' .grad stay untouched
            p.requires_grad_(False)
        with torch.enable_grad():
            outer = [nm for nm in names if nm.startswith("norm_f.")]  # a norm_f hook must see every position
            g = grad_into(inputs[_resid_in(n, n)], lambda x: metric((model.unembed(x) if outer else model.unembed(x[:, -1:]))[:, -1]),
                          outer, None)
            for i in reversed(range(n)):
                here = [nm for nm in names if nm.startswith(f"blocks.{i}.")]
                g = grad_into(inputs[_resid_in(i, n)], model.blocks[i], here, g)
    finally:
        for p in weights:
            p.requires_grad_(True)
    grads = {nm: leaf.grad for nm, leaf in leaves.items()}
    if "hook_embed" in names:  # the embedding is block 0's input
        grads["hook_embed"] = g
    missing = [nm for nm in names if nm not in grads]
    if missing:
        raise DiffMambaError(f"hook {missing[0]!r} did not fire")
    out = {}
    for name in names:
        grad = grads[name]
        diff = (clean_vals[name] - corrupt_vals[name]).to(grad.dtype)  # [1, L, ...]
        per_pos = (diff * grad).flatten(2).sum(-1)[0]  # [L]
        for p in positions:
            out[(name, p)] = corrupt_metric + float(per_pos[p])  # the estimate of the patched metric
    return out, _baseline(model, clean_vals, metric), corrupt_metric


# -- the entry point ------------------------------------------------------------------------------
def _ids(model, prompt, what: str) -> Tensor:
    if isinstance(prompt, Tensor) and prompt.ndim == 2:
        if prompt.shape[0] != 1:
            raise DiffMambaError(f"{what} must be one prompt (batch 1), got batch {prompt.shape[0]}; patch pairs one at a time")
        ids = prompt
    else:
        ids = torch.tensor(encode_prompts([prompt], model.tokenizer), dtype=torch.long)
    model.check_input_ids(ids)
    return ids.to(model.device)


@unknown_tokens_once()  # the clean and the corrupted prompt: one warning of unknown tokens
def patch(model, clean, corrupt, metric: Metric | None = None, *, answer=None, wrong=None, what: str = "resid",
          method: str = "exact", positions=None, layers=None, conv: bool = False, batch_size: int = 32,
          chunk_size: int | None = None, progress: bool = True) -> PatchingResult:
    """Patch `what` from the clean run into the corrupted one over layers × positions.

    clean, corrupt: texts or token ids ([pos] or [1, pos]) of the same token length. metric: a
    function of the last position's logits [rows, V] -> [rows]; or answer (and wrong) as texts or
    token ids: logit_diff(answer, wrong), or answer_prob(answer) without `wrong`.
    what: "resid" (hook_resid_pre of every block), "mixer" (hook_mixer_out), "branch" (each branch
    of every differential layer), "state" (each scan unit's SSM state, the recurrence carried), a
    hook name, or a hook name with {layer}. method: "exact" or "attribution" (not for states).
    positions: which positions (default all; negatives count from the end); layers: which blocks.
    conv: state patching also takes the clean conv state (the last K − 1 conv inputs).
    batch_size: patched cells per forward.
    """
    if method not in METHODS:
        raise DiffMambaError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "attribution" and what == "state":
        raise DiffMambaError("attribution patching of states is not available (the gradient of hook_ssm_state covers "
                             "only each position's readout, not the recurrence); use method='exact'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DiffMambaError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunk = check_chunk_size(chunk_size)
    clean_ids, corrupt_ids = _ids(model, clean, "clean"), _ids(model, corrupt, "corrupt")
    if clean_ids.shape != corrupt_ids.shape:
        raise DiffMambaError(f"the clean and corrupted prompts must have the same token length, got "
                             f"{clean_ids.shape[1]} and {corrupt_ids.shape[1]}")
    if metric is None:
        if answer is None:
            raise DiffMambaError("give a metric, or answer= (and wrong= for a logit difference)")
        a = first_token(answer, model.tokenizer)[0]
        b = first_token(wrong, model.tokenizer, what="wrong answer")[0] if wrong is not None else None
        for t in (a, b):
            if t is not None and not 0 <= t < model.cfg.vocab_size:
                raise DiffMambaError(f"answer token id {t} is out of range for vocab size {model.cfg.vocab_size}")
        metric = logit_diff(a, b) if b is not None else answer_prob(a)
    L = corrupt_ids.shape[1]
    pos = normalize_positions(positions, L) or list(range(L))
    cells = _cells(model, what, layers)
    if method == "attribution":
        values, clean_metric, corrupt_metric = _attribution(model, clean_ids, corrupt_ids, cells, pos, metric, chunk)
    else:
        bar = tqdm(total=len(cells) * len(set(pos)), desc=f"patching {what}", file=sys.stderr,
                   disable=not progress or not is_main())
        if what == "state":
            values, clean_metric, corrupt_metric = _state(model, clean_ids, corrupt_ids, cells, pos, metric, batch_size,
                                                          chunk, conv, bar)
        else:
            values, clean_metric, corrupt_metric = _exact(model, clean_ids, corrupt_ids, cells, pos, metric, batch_size, chunk, bar)
        bar.close()
        gather_rows(list(values), values)  # every rank: every cell
    tokens = (model.tokenizer.convert_ids_to_tokens(corrupt_ids[0].tolist()) if model.tokenizer is not None
              else [str(t) for t in corrupt_ids[0].tolist()])
    span = clean_metric - corrupt_metric
    rows = [(c.component, c.layer, c.name, p, tokens[p], values[(c.name, p)]) for c in cells for p in sorted(set(pos))]
    df = pd.DataFrame(rows, columns=["component", "layer", "hook", "position", "token", "value"])
    df["value"] = df["value"].astype(np.float64)
    df["normalized"] = (df["value"] - corrupt_metric) / span if span != 0 else np.nan
    return PatchingResult(df, what, method, getattr(metric, "label", "metric"), clean_metric, corrupt_metric, tokens)
