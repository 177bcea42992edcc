"""Implicit attention pages that stay readable and small at any length: the answer-row figure and
an attention report with a hard cap on its size (the `attention` command).

An answer-row entry (`attention_views.attention_view(view="row")`)::

    {"view": "row", "title": str, "rows": {name: array[n]}, "positions": [n ints], "tokens": [n],
     "target": int, "marks": [[start, stop), ...]}

Full-view entries are drawn by `figures.attention_figure` as in every report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DiffMambaError
from ..files import write_atomic
from .figures import _FONT, _text, _token_label, attention_figure
from .html import _meta_block, _Page

__all__ = ["MAX_HTML_BYTES", "answer_row_figure", "write_attention_report"]

MAX_HTML_BYTES = 10 * 1024 * 1024  # one attention page at most (plotly.js itself is ~4.8 MB of it)
HOVER_TOKENS = 4096  # token text in every trace's hover up to this many positions, in the first above
MAX_MARKS = 200  # needle ranges drawn
_PLOTLYJS_BYTES = 4_900_000
_COLOURS = {"branch 1": "#0072B2", "branch 2": "#D55E00", "differential": "#000000", "layer": "#009E73"}


def _short(z, digits: int = 4) -> np.ndarray:
    """Each value rounded to `digits` significant digits: the same picture in far shorter JSON."""
    z = np.asarray(z, dtype=np.float64)
    out = z.copy()
    nz = np.isfinite(z) & (z != 0)
    f = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(z[nz]))))
    out[nz] = np.round(z[nz] * f) / f
    return out


def _shortened(entry: Mapping) -> dict:
    """A copy of a full-view entry with its maps' values shortened (for `attention_figure`'s JSON)."""
    return {**entry, "maps": {k: _short(v) for k, v in dict(entry["maps"]).items()}}


def _row_colour(name: str) -> str:
    for key, colour in _COLOURS.items():
        if name.endswith(key):
            return colour
    return "#555555"


def _check_row_entry(entry) -> tuple[dict, list, list]:
    if not isinstance(entry, Mapping):
        raise DiffMambaError(f"answer-row entry must be a dict, got {type(entry).__name__}")
    missing = [k for k in ("title", "rows", "positions", "tokens", "target") if k not in entry]
    if missing:
        raise DiffMambaError(f"answer-row entry is missing key(s): {', '.join(missing)}")
    positions, tokens = list(entry["positions"]), list(entry["tokens"])
    rows = {str(k): np.asarray(v, dtype=np.float64) for k, v in dict(entry["rows"]).items()}
    if not rows:
        raise DiffMambaError("answer-row entry 'rows' must be a non-empty dict name -> 1-D array")
    for name, r in rows.items():
        if r.shape != (len(positions),):
            raise DiffMambaError(f"answer row {name!r} has shape {r.shape}, expected ({len(positions)},) to match the positions")
    if len(tokens) != len(positions):
        raise DiffMambaError(f"answer-row entry has {len(tokens)} tokens for {len(positions)} positions")
    return rows, positions, tokens


def answer_row_figure(entry: Mapping) -> go.Figure:
    """One panel per map, stacked on a shared source-position axis: how much each source s feeds the
    target (the last position). Needle ranges (``marks``) are shaded in every panel."""
    rows, positions, tokens = _check_row_entry(entry)
    names = list(rows)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=min(0.04, 0.25 / len(names)),
                        subplot_titles=[_text(n) for n in names])
    labels = np.array([_token_label(t) for t in tokens], dtype=object)
    n = len(positions)
    x0 = positions[0] if positions else 0
    contiguous = positions == list(range(x0, x0 + n))
    for i, name in enumerate(names, start=1):
        kw = dict(x0=x0, dx=1) if contiguous else dict(x=np.asarray(positions))
        if n <= HOVER_TOKENS or i == 1:
            kw.update(text=labels, hovertemplate="source %{x} %{text}<br>%{y:.4g}<extra>" + _text(name) + "</extra>")
        else:
            kw.update(hovertemplate="source %{x}<br>%{y:.4g}<extra>" + _text(name) + "</extra>")
        fig.add_trace(go.Scatter(y=rows[name].astype(np.float32), mode="lines", name=_text(name),
                                 line=dict(width=1, color=_row_colour(name)), showlegend=False, **kw), row=i, col=1)
        fig.update_yaxes(zeroline=True, zerolinecolor="#bbb", row=i, col=1)
    for lo, hi in list(entry.get("marks") or [])[:MAX_MARKS]:  # shaded, with a line so that a few tokens of 16k show
        fig.add_vrect(x0=lo - 0.5, x1=hi - 0.5, row="all", col=1, fillcolor="#E69F00", opacity=0.25, line_width=0)
        fig.add_vline(x=(lo + hi - 1) / 2, row="all", col=1, line=dict(color="#E69F00", width=1, dash="dot"))
    fig.update_xaxes(title_text="source position s", row=len(names), col=1)
    marks = " Shaded: the needle's tokens." if entry.get("marks") else ""
    how = (f"Each panel is row t = {entry['target']} (the answer position) of one map: how much source position "
           "s feeds it. Branch and differential panels are channel averages (the differential is a picture, "
           "not the operator); 'output norm' is ‖O[t,s]‖_F of the operator the block applies in its output "
           "space (per branch term where named); 'logit' is each source's push on the answer's logit through "
           f"this block's output.{marks}")
    fig.update_layout(title=dict(text=_text(entry["title"]), x=0.0, xanchor="left"), meta={"how_to_read": how},
                      template="plotly_white", height=min(1600, 140 + 170 * len(names)), font=_FONT,
                      margin=dict(l=70, r=30, t=80, b=60), hovermode="closest")
    return fig


def _estimate_bytes(entries: Sequence[Mapping]) -> int:
    """What the figures' data will take, before drawing anything (numbers as JSON or base64, labels)."""
    total = _PLOTLYJS_BYTES
    for e in entries:
        if e.get("view") == "row":
            n = len(e["positions"])
            tok = sum(len(str(t)) + 4 for t in e["tokens"])
            total += len(e["rows"]) * (6 * n) + (tok * len(e["rows"]) if n <= HOVER_TOKENS else tok)
        else:
            n = len(e["tokens"])
            tok = 2 * sum(len(str(t)) + 4 for t in e["tokens"]) * n if n <= 256 else 0
            total += len(e["maps"]) * (12 * n * n + tok)
    return total


def _too_big(size: float, cap: int, what: str) -> DiffMambaError:
    return DiffMambaError(
        f"the attention page would be {what}{size / 2**20:.1f} MB, above the cap of {cap / 2**20:.1f} MB: show fewer "
        "positions (--positions a:b), use the answer row (--view row), average more (a smaller --max-side) or "
        "raise --max-mb")


def write_attention_report(path, *, title: str, entries: Sequence[Mapping], meta: Mapping | None = None,
                           max_bytes: int = MAX_HTML_BYTES) -> Path:
    """One self-contained HTML page of attention entries (full maps: `attention_figure`; answer rows:
    `answer_row_figure`), refused with a clear message and nothing written when it would exceed
    `max_bytes` (estimated before drawing, measured before writing)."""
    entries = [entries] if isinstance(entries, Mapping) else list(entries)
    if not entries:
        raise DiffMambaError("no attention entries to write")
    estimate = _estimate_bytes(entries)
    if estimate > max_bytes:
        raise _too_big(estimate, max_bytes, "about ")
    page = _Page()
    page.section("Implicit attention")
    for k, entry in enumerate(entries):
        fig = answer_row_figure(entry) if entry.get("view") == "row" else attention_figure(_shortened(entry))
        page.figure(fig, f"attention-{k}")
    data = page.document(title, _meta_block(meta, None), contents=False).encode("utf-8")
    if len(data) > max_bytes:
        raise _too_big(len(data), max_bytes, "")
    return write_atomic(path, data)  # temp file + rename: never a half-written report
