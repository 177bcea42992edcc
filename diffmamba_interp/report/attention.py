"""Implicit attention figures at any length, for every page that shows them (the `attention` command's
page and the full report): the answer-row figure, and `attention_figures`, which draws a list of
entries with shortened numbers and one colour scale shared by every full map.

An answer-row entry (`attention_views.attention_view(view="row")`)::

    {"view": "row", "title": str, "rows": {name: array[n]}, "positions": [n ints], "tokens": [n],
     "target": int, "marks": [[start, stop), ...]}

Full-view entries are drawn by `figures.attention_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DiffMambaError
from .figures import _FONT, _attention_arrays, _text, _token_label, attention_figure, attention_range

__all__ = ["HOVER_TOKENS", "answer_row_figure", "attention_figures"]

HOVER_TOKENS = 4096  # token text in every trace's hover up to this many positions, in the first above
MAX_MARKS = 200  # needle ranges drawn
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


def _is_row(entry) -> bool:
    return isinstance(entry, Mapping) and entry.get("view") == "row"


def attention_figures(entries: Sequence[Mapping]) -> list[go.Figure]:
    """One figure per entry: answer rows as line panels, full maps as heat-maps whose values are shortened
    (`_short`) and which all share one colour scale (`attention_range` over every full map), so that
    models and branches can be compared by eye."""
    full = [e for e in entries if not _is_row(e)]
    zrange = attention_range(z for e in full for z in _attention_arrays(e)[0].values()) if full else None
    return [answer_row_figure(e) if _is_row(e) else attention_figure(_shortened(e), zrange=zrange) for e in entries]
