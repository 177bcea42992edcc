"""The report's "Attention to the needle" section: per block and model, the share of the answer row's
implicit attention that falls on the supporting facts (`analysis.needle_attention`), each branch and
the differential map of a differential block, every model on one y axis.

Input schema (validated; a missing column raises :class:`DiffMambaError` naming it): ``needle``, the
`NeedleAttention.summary` frame: model, layer (block index i), map, mean, ci_low, ci_high, n, baseline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DiffMambaError
from ..schemas import check_columns
from .figures import BLOCK_AXIS, _custom, _err, _finish, _floats, _layer_dtick, _text, _unique, block_label, log_ticks

__all__ = ["NEEDLE_COLUMNS", "NEEDLE_MAPS", "needle_share_figure", "needle_section"]

NEEDLE_COLUMNS = ("model", "layer", "map", "mean", "ci_low", "ci_high", "n", "baseline")
# the maps drawn: a plain block's map, a differential block's two branches and their difference
NEEDLE_MAPS = ("layer", "branch 1", "branch 2", "differential")
_MAP_NAMES = {"layer": "plain block's map", "branch 1": "branch 1", "branch 2": "branch 2",
              "differential": "differential (branch 1 − λ·branch 2)"}
_MAP_COLOURS = {"layer": "#009E73", "branch 1": "#0072B2", "branch 2": "#D55E00", "differential": "#000000"}
_MAP_SYMBOLS = {"layer": "square", "branch 1": "circle", "branch 2": "triangle-up", "differential": "diamond"}
_MAP_OFFSETS = {"layer": 0.0, "branch 1": -0.22, "branch 2": 0.0, "differential": 0.22}  # x offset from the block
_BASELINE = "needle's share of the tokens (a uniform row)"
LOG_BELOW = 0.02  # a baseline below this (long prompts: the needle is a sliver of the tokens) puts the y axis on a log scale


def needle_share_figure(summary: pd.DataFrame, maps=NEEDLE_MAPS) -> go.Figure:
    """Points with 95% whiskers of the mean needle share per block, one row of panels per model (one
    shared x axis, one y range for all), one colour and symbol per map (`NEEDLE_MAPS`: a plain block's
    map, or a differential block's branches and differential map), and a dashed line at each model's
    baseline. A map's first trace carries its legend entry, so the legend names every map once."""
    check_columns(summary, NEEDLE_COLUMNS, "needle")
    df = summary[summary["map"].isin(maps)].copy()
    if df.empty:
        raise DiffMambaError(f"needle has no rows of the maps {', '.join(maps)}")
    df["layer"] = pd.to_numeric(df["layer"], errors="raise").astype(int)
    df = df.sort_values("layer", kind="stable")
    models = _unique(df["model"])
    present = [m for m in maps if m in set(df["map"])]
    rows = len(models)
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=min(0.12, 0.3 / rows) if rows > 1 else 0,
                        subplot_titles=[_text(m) for m in models])
    values = np.r_[_floats(df["ci_high"]), _floats(df["mean"]), _floats(df["ci_low"]), _floats(df["baseline"])]
    top = float(np.nanmax(values[np.isfinite(values)])) if np.isfinite(values).any() else 1.0
    y_range = [0.0, min(1.0, top * 1.1) if top > 0 else 1.0]
    positive = values[np.isfinite(values) & (values > 0)]
    log = bool(positive.size) and float(np.nanmin(_floats(df["baseline"]))) < LOG_BELOW
    if log:  # shares of a long prompt span decades: a log axis keeps the baseline and the needle apart
        y_range = [float(np.log10(positive.min() / 1.5)), float(np.log10(min(1.0, positive.max() * 1.5)))]
    lo_layer, hi_layer = int(df["layer"].min()), int(df["layer"].max())
    named: set = set()
    for r, model in enumerate(models, start=1):
        dm = df[df["model"] == model]
        for name in present:
            d = dm[dm["map"] == name]
            if d.empty:
                continue
            mean, lo, hi = _floats(d["mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
            ratio = mean / np.where(_floats(d["baseline"]) > 0, _floats(d["baseline"]), np.nan)
            fig.add_trace(go.Scatter(
                x=(d["layer"] + _MAP_OFFSETS.get(name, 0.0)).tolist(), y=mean.tolist(), mode="markers",
                name=_MAP_NAMES.get(name, _text(name)), legendgroup=name, showlegend=name not in named,
                marker=dict(size=9, color=_MAP_COLOURS.get(name, "#555555"), symbol=_MAP_SYMBOLS.get(name, "circle")),
                error_y=dict(type="data", symmetric=False, array=_err(hi, mean), arrayminus=_err(mean, lo),
                             thickness=1.2, width=3, color=_MAP_COLOURS.get(name, "#555555")),
                customdata=_custom(d["layer"].map(block_label), lo, hi, ratio, d["n"]),
                hovertemplate=(f"<b>{_text(model)}</b> · {_text(name)}<br>%{{customdata[0]}}<br>needle share %{{y:.3f}}"
                               "<br>95% CI [%{customdata[1]:.3f}, %{customdata[2]:.3f}]"
                               "<br>%{customdata[3]:.2f}× the uniform share · n = %{customdata[4]}<extra></extra>"),
            ), row=r, col=1)
            named.add(name)
        base = float(np.nanmean(_floats(dm["baseline"])))
        fig.add_trace(go.Scatter(
            x=[lo_layer - 0.45, hi_layer + 0.45], y=[base, base], mode="lines", name=_BASELINE, legendgroup="baseline",
            showlegend=r == 1, line=dict(color="#777777", width=1.5, dash="dash"),
            hovertemplate=f"<b>{_text(model)}</b><br>needle tokens / all tokens: %{{y:.3f}}<extra></extra>",
        ), row=r, col=1)
        fig.update_yaxes(title_text="share on the needle" + (" (log)" if log else ""), range=y_range, row=r, col=1)
        if log:
            ticks, text = log_ticks(positive)
            fig.update_yaxes(type="log", tickmode="array", tickvals=ticks, ticktext=text, row=r, col=1)
    fig.update_xaxes(title_text=BLOCK_AXIS, row=rows, col=1)
    fig.update_xaxes(dtick=_layer_dtick(df["layer"]), range=[lo_layer - 0.5, hi_layer + 0.5])
    n = int(pd.to_numeric(df["n"], errors="coerce").max())
    how = (f"Each point is the share of a block's answer row (what the last prompt position reads through the block's "
           f"implicit attention: conv, gate and scan folded in; absolute values) that falls on the supporting-fact "
           f"tokens, averaged over {n} examples, with a 95% bootstrap interval over stories. The dashed line is the "
           "needle's share of the tokens, what a uniform row gives: above it the block favours the needle. A "
           "differential block shows each branch and the differential map (the subtraction is meant to cancel "
           "attention noise the branches share, raising the needle's share). Every panel shares one y axis"
           + (", logarithmic: the needle is a small part of these long prompts." if log else "."))
    _finish(fig, title="Attention to the needle: share of each block's answer row on the supporting facts",
            how=how, xlabel=None, ylabel=None, height=max(380, 270 * rows + 130))
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02), margin=dict(r=260))
    return fig


def needle_section(page, summary: pd.DataFrame) -> None:
    """The section on `page` (a `report.html._Page`): its heading and the figure."""
    page.section("Attention to the needle")
    page.figure(needle_share_figure(summary), "needle-attention")
