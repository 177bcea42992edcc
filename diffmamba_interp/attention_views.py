"""Views of one layer's implicit attention that fit in one HTML page at any length: the report
entries behind `jobs.attention_entry` and the `attention` command.

- ``view="full"``: the maps over target t × source s, for positions a:b (``positions``; all by
  default). Above `max_side` positions a side the map is averaged over blocks (so a side has at most
  `max_side` cells); it is computed `ROW_CHUNK` target rows at a time and pooled at once, so memory
  stays O(ROW_CHUNK·L) per channel. Above `MAX_FULL_CELLS` (t × s cells to compute) it refuses and
  says to pick a window or the row view.
- ``view="row"``: the answer row, what the last position reads from each source s (in a:b), for
  every map (`analysis.answer_row`): per branch, the differential summary, the output-space norm per
  term and, with an answer word, each source's push on the answer's logit; O(L) per channel, so a
  16k-token prompt is fine. ``needles`` (substrings of the prompt) are marked.

kind "s6" / "block" give the channel-reduced maps (`reduce`), kind "output" the output-space
operator's Frobenius norm ‖O[t,s]‖_F (whole block and each branch's term).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .errors import DiffMambaError

VIEWS = ("full", "row")
MAX_SIDE = 128  # cells a side in a full map before averaging over blocks
MAX_FULL_CELLS = 8192 * 8192  # t × s cells a full view may compute
ROW_CHUNK = 256  # target rows per step in a full view


def parse_positions(text: str | None, L: int) -> tuple[int, int]:
    """``"a:b"`` (a Python slice, ends optional, negative from the end) -> (a, b); None -> (0, L)."""
    if text is None or str(text).strip() in ("", ":"):
        return 0, L
    parts = str(text).split(":")
    if len(parts) != 2:
        raise DiffMambaError(f"--positions must be a:b (e.g. 100:200, -300:, :64), got {text!r}")
    try:
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise DiffMambaError(f"--positions must be a:b with whole numbers, got {text!r}") from None
    a = 0 if a is None else (a + L if a < 0 else a)
    b = L if b is None else (b + L if b < 0 else b)
    if not 0 <= a < b <= L:
        raise DiffMambaError(f"--positions {text} selects no positions of this {L}-token prompt (0..{L - 1})")
    return a, b


class LayerMaps:
    """One forward's cache for a layer's maps, and those maps for any block of target rows [T, L]."""

    def __init__(self, model, ids: torch.Tensor, layer: int, branch: int | None, kind: str, reduce: str):
        from .analysis.attention import AttentionTarget, _check_args, _run, attention_target, differential_of

        _check_args(kind, None if kind == "output" else reduce, None)
        block = model.blocks[layer]
        self.diff = differential_of(block, layer)
        if branch is not None and self.diff is None:
            raise DiffMambaError(f"layer {layer} is not differential: drop --branch")
        self.kind, self.reduce = kind, reduce
        if kind == "output":
            self.targets = {"output norm": attention_target(model, layer, None, "output")}
        elif self.diff is not None:
            self.targets = {f"branch {k}": AttentionTarget(self.diff[0], self.diff[1], k) for k in ([branch] if branch else [1, 2])}
        else:
            self.targets = {"layer": attention_target(model, layer, None)}
        self.branch = branch
        names = [n for name, t in self.targets.items() for n in t.hooks(kind)]
        if self.diff is not None:
            names.append(f"{self.diff[0]}.hook_lambda")
        self.cache = _run(model, ids, names)

    def rows(self, r0: int, r1: int) -> dict[str, np.ndarray]:
        """Rows r0..r1−1 over all L sources. Maps are causal, so these rows of the prefix 0..r1−1 are
        the full map's (columns from r1 on are 0): the hooks are cut to r1 positions first."""
        from .implicit import MapOptions

        opts = MapOptions(rows=(r0, r1))
        L = next(v.shape[1] for v in self.cache.values() if v.ndim >= 2)
        cache = {k: v[:, :r1] if v.ndim >= 2 and v.shape[1] == L else v for k, v in self.cache.items()}
        return {k: np.pad(v, ((0, 0), (0, L - r1))) for k, v in self._rows(cache, opts).items()}

    def _rows(self, cache, opts) -> dict[str, np.ndarray]:
        out = {}
        if self.kind == "output":
            op = self.targets["output norm"].compute(cache, "output", None, None, opts)
            s = op.summaries(norm=True)
            several = len(op.branches) > 1
            if self.branch is None:
                out["output norm"] = s.norm[0]
            if several:
                for k, (name, nk) in enumerate(zip(op.names, s.norm_branches), start=1):
                    if self.branch in (None, k):
                        out[f"output norm, {name}"] = nk[0]
        else:
            for name, t in self.targets.items():
                m = t.compute(cache, self.kind, self.reduce, None, opts)
                out[name] = (m if isinstance(m, torch.Tensor) else m.matrix)[0]
            if self.diff is not None and self.branch is None:
                out["differential"] = out["branch 1"] - cache[f"{self.diff[0]}.hook_lambda"] * out["branch 2"]
        return {k: v.double().cpu().numpy() for k, v in out.items()}


def full_maps(maps: LayerMaps, a: int, b: int, max_side: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The maps over t, s in a..b−1, averaged over blocks when b − a > max_side: ({name: [side, side]},
    bin edges [side + 1]); computed ROW_CHUNK rows at a time."""
    n = b - a
    side = min(n, max_side)
    edges = np.unique(np.linspace(a, b, side + 1).round().astype(int))
    side = len(edges) - 1
    sizes = np.diff(edges).astype(np.float64)
    out: dict[str, np.ndarray] = {}
    i = 0
    while i < side:
        j = i + 1
        while j < side and edges[j + 1] - edges[i] <= ROW_CHUNK:
            j += 1
        r0, r1 = int(edges[i]), int(edges[j])
        for name, z in maps.rows(r0, r1).items():
            cols = np.add.reduceat(z[:, a:b], edges[:-1] - a, axis=1)  # [T, side]
            pooled = np.add.reduceat(cols, edges[i:j] - r0, axis=0)  # [j − i, side]
            out.setdefault(name, np.zeros((side, side)))[i:j] = pooled / (sizes[i:j, None] * sizes[None, :])
        i = j
    return out, edges


def needle_marks(tokenizer, text: str, needles: Sequence[str], a: int, b: int) -> list[list[int]]:
    """Token ranges [[start, stop), ...] (absolute positions, clipped to a..b) of every occurrence of
    each needle string in the prompt."""
    from .analysis.needle_attention import needle_token_mask

    spans = []
    for needle in needles:
        if not needle:
            continue
        at = text.find(needle)
        if at < 0:
            raise DiffMambaError(f"--needle {needle!r} is not in the prompt")
        while at >= 0:
            spans.append((at, at + len(needle)))
            at = text.find(needle, at + 1)
    if not spans:
        return []
    mask = needle_token_mask(tokenizer, text, spans)
    marks, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            lo, hi = max(start, a), min(i, b)
            if lo < hi:
                marks.append([lo, hi])
            start = None
    return marks


def attention_view(model, prompt: str, layer: int, branch: int | None = None, kind: str = "s6", reduce: str = "mean",
                   view: str = "full", positions: str | None = None, max_side: int = MAX_SIDE,
                   answer: str | None = None, needles: Sequence[str] = ()) -> dict:
    """A report entry for one model and layer (module docstring): full view
    ``{"title", "maps": {name: [n, n]}, "tokens": [n]}`` (the schema of `report.attention_figure`;
    for averaged maps the "tokens" are the blocks' position ranges) or row view
    ``{"view": "row", "title", "rows": {name: [n]}, "positions", "tokens", "target", "marks"}``."""
    if view not in VIEWS:
        raise DiffMambaError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 2:
        raise DiffMambaError(f"--max-side must be a whole number >= 2, got {max_side!r}")
    if not 0 <= layer < model.cfg.n_layers:
        raise DiffMambaError(f"layer {layer} is out of range: the model has blocks 0..{model.cfg.n_layers - 1}")
    tok = model.tokenizer
    if tok is None:
        raise DiffMambaError(f"checkpoint {model.checkpoint_path} has no tokenizer; this command needs text input")
    ids = model.to_tokens(prompt)
    tokens = model.to_str_tokens(prompt)
    L = ids.shape[-1]
    a, b = parse_positions(positions, L)
    label = getattr(model, "label", model.cfg.arch)
    what = ("output-space operator, ‖O[t,s]‖_F" if kind == "output" else f"{kind} map ({reduce} over channels/heads)")
    window = "" if (a, b) == (0, L) else f", positions {a}:{b}"
    if view == "full" and (answer is not None or needles):
        raise DiffMambaError("--answer and --needle are for the answer row (--view row)")
    if view == "row":
        return _row_entry(model, ids, tokens, layer, branch, kind, reduce, a, b, answer, needles, tok, prompt,
                          f"{label}: block {layer}, answer row (target {L - 1}){window}")
    if (b - a) * L > MAX_FULL_CELLS:
        raise DiffMambaError(
            f"the full map of {b - a:,} target × {L:,} source positions is too much to compute "
            f"(over {MAX_FULL_CELLS:,} cells): pick a window with --positions a:b or use --view row")
    maps, edges = full_maps(LayerMaps(model, ids, layer, branch, kind, reduce), a, b, max_side)
    n = len(edges) - 1
    if n == b - a:
        labels = tokens[a:b]
        note = ""
    else:
        labels = [f"{edges[i]}–{edges[i + 1] - 1}" for i in range(n)]
        note = f", averaged over blocks of ~{math.ceil((b - a) / n)} positions ({b - a} → {n} a side)"
    return {"title": f"{label}: block {layer}, {what}{window}{note}",
            "maps": {k: v.astype(np.float32) for k, v in maps.items()}, "tokens": labels}


def _row_entry(model, ids, tokens, layer, branch, kind, reduce, a, b, answer, needles, tok, prompt, title) -> dict:
    from .analysis.answer_row import answer_row
    from .analysis.attention import differential_of
    from .analysis.inputs import first_token

    if branch is not None and differential_of(model.blocks[layer], layer) is None:
        raise DiffMambaError(f"layer {layer} is not differential: drop --branch")
    answer_id = None
    if answer is not None:
        answer_id, n_tokens, _ = first_token(answer, tok)
        if n_tokens != 1:
            raise DiffMambaError(f"answer {answer!r} is {n_tokens} tokens for this tokenizer; give one word")
    res = answer_row(model, ids, layer, kind="block" if kind == "output" else kind, reduce=reduce, answer=answer_id)
    keep = {}
    for name, r in res.maps.items():
        if kind == "output" and not name.startswith(("output norm", "logit")):
            continue
        if branch is not None and name != f"branch {branch}" and not name.endswith(f"branch {branch}"):
            continue
        keep[name] = r[0, a:b].float().cpu().numpy()
    entry = {"view": "row", "title": title, "rows": keep, "positions": list(range(a, b)), "tokens": tokens[a:b],
             "target": int(ids.shape[-1] - 1), "marks": needle_marks(tok, prompt, needles, a, b)}
    if res.logit_rest is not None:
        entry["logit_rest"] = float(res.logit_rest[0])
    return entry
