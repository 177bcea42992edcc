"""Plotly figure builders for the report, working purely from DataFrames / numpy arrays.

Every builder returns a ``plotly.graph_objects.Figure`` with a title and axis labels, and keeps a
one-sentence "how to read this" note in ``fig.layout.meta["how_to_read"]`` (read it back with
:func:`how_to_read`). Layer numbering follows docs/conventions.md, "Lens and SNR": layer 0 = embeddings, layer k = residual
stream after block k; the branch figure uses block indices i (block i writes into layer i + 1). Every
per-layer axis title and hover also gives the paper's index (layer k = the paper's layer k − 1).

Input schemas (validated; a missing column raises :class:`DiffMambaError` naming it):

- ``summary``: model, layer, measure, mean, median, ci_low, ci_high
- ``paired``: model_a, model_b, layer, measure, diff_mean (b − a), ci_low, ci_high
- ``branch``: model, layer (block index), component, value
- attention entry: ``{"title": str, "maps": {name: array[pos, pos]}, "tokens": list[str]}``
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DiffMambaError
from ..schemas import (BRANCH_COLUMNS, BRANCH_COMPONENTS, PAIRED_COLUMNS, REPORT_PAIRED_COLUMNS,
                       REPORT_SUMMARY_COLUMNS, SUMMARY_COLUMNS, check_columns)

__all__ = [
    "SUMMARY_COLUMNS",
    "PAIRED_COLUMNS",
    "BRANCH_COLUMNS",
    "MEASURE_LABELS",
    "BRANCH_COMPONENTS",
    "how_to_read",
    "check_columns",
    "needle_prob_figure",
    "measure_curves_figure",
    "paired_figure",
    "branch_figure",
    "attention_figure",
    "attention_range",
    "patching_figure",
    "PATCHING_MAX_COLUMNS",
    "layer_label",
    "block_label",
    "log_ticks",
    "paired_direction",
    "LOWER_IS_BETTER",
]


MEASURE_LABELS = {
    "prob": "needle probability",
    "logprob": "needle log-probability",
    "rank": "rank of the needle token",
    "snr_db": "signal-to-noise ratio (dB)",
    "distractor_ratio": "needle / other-candidates probability ratio",
    "distractor_log_ratio": "needle / other-candidates log-ratio (ln)",
}
_MEASURE_HOW = {
    "prob": "higher = the lens puts more mass on the needle token",
    "logprob": "higher (closer to 0) = more mass on the needle token",
    "rank": "lower = the needle token is nearer the top of the lens distribution (1 = top)",
    "snr_db": "higher = the needle stands out more from the rest of the distribution",
    "distractor_ratio": "above 1 = the needle beats the story's other candidate answers together",
    "distractor_log_ratio": "above 0 = the needle beats the story's other candidate answers together",
}
LOWER_IS_BETTER = frozenset({"rank"})  # measures where a smaller value means the needle is read better

LAYER_AXIS = "layer (0 = embeddings, k = residual after block k = the paper's layer k − 1)"
BLOCK_AXIS = "block index i (0-based; block i writes into layer i + 1 = the paper's layer i)"

# Colour-blind-friendly palette (Okabe-Ito) for models; fixed colours for branch components.
_MODEL_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
                  "#F0E442")
_COMPONENT_COLOURS = {"mixer_1": "#0072B2", "-λ·mixer_2": "#D55E00", "block": "#555555"}
_EXTRA_COMPONENT_COLOURS = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9")
_DIVERGING = "RdBu_r"  # blue < 0 < red, white at the centre
_SEQUENTIAL = "Viridis"
_FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif")


# --------------------------------------------------------------------------------------- helpers


def how_to_read(fig: go.Figure) -> str:
    """The figure's one-sentence reading guide (kept in ``fig.layout.meta["how_to_read"]``)."""
    meta = fig.layout.meta
    if isinstance(meta, Mapping) and "how_to_read" in meta:
        return str(meta["how_to_read"])
    return ""


def _text(s) -> str:
    """Escape a user string for plotly's pseudo-HTML text (tokens like '<context>' stay visible)."""
    return _html.escape(str(s), quote=False)


def _unique(values: Iterable) -> list:
    """Unique values in order of first appearance."""
    return list(dict.fromkeys(values))


def _model_colours(models: Sequence) -> dict:
    return {m: _MODEL_COLOURS[i % len(_MODEL_COLOURS)] for i, m in enumerate(models)}


def _floats(series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def _err(upper: np.ndarray, lower: np.ndarray) -> list:
    """Non-negative whisker lengths (NaN -> None so plotly draws no whisker)."""
    d = np.maximum(upper - lower, 0.0)
    return [None if not np.isfinite(v) else float(v) for v in d]


def layer_label(layer) -> str:
    """A lens layer as hover text: "layer k (paper k − 1)"; layer 0 (embeddings) has no paper index."""
    k = int(layer)
    return "layer 0 (embeddings; not in the paper)" if k == 0 else f"layer {k} (paper {k - 1})"


def block_label(block) -> str:
    """A block index as hover text: block i writes into layer i + 1, the paper's layer i."""
    i = int(block)
    return f"block {i} (writes layer {i + 1}; paper {i})"


def _custom(labels, *columns) -> np.ndarray:
    """customdata [n, 1 + k]: a text label then numeric columns (hover reads %{customdata[j]})."""
    return np.stack([np.asarray(labels, dtype=object), *(np.asarray(c, dtype=object) for c in columns)], axis=-1)


def _select_measure(df: pd.DataFrame, measure: str, name: str) -> pd.DataFrame:
    sub = df[df["measure"] == measure]
    if sub.empty:
        have = ", ".join(map(str, _unique(df["measure"]))) or "none"
        raise DiffMambaError(f"{name} has no rows with measure={measure!r} (has: {have})")
    sub = sub.copy()
    sub["layer"] = pd.to_numeric(sub["layer"], errors="raise").astype(int)
    return sub.sort_values("layer", kind="stable")


def _finish(fig: go.Figure, *, title: str, how: str, xlabel: str | None, ylabel: str | None,
            height: int = 460) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left"),
        meta={"how_to_read": how},
        template="plotly_white",
        height=height,
        font=_FONT,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        margin=dict(l=70, r=30, t=80, b=60),
        hovermode="closest",
    )
    if xlabel is not None:
        fig.update_xaxes(title_text=xlabel)
    if ylabel is not None:
        fig.update_yaxes(title_text=ylabel)
    return fig


def _measure_label(measure: str) -> str:
    return MEASURE_LABELS.get(measure, measure.replace("_", " "))


def _layer_dtick(layers) -> int:
    n = int(pd.Series(layers).nunique())
    return max(1, math.ceil(n / 25))


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _stat_hover(model: str, value: str = "mean") -> str:
    """Hover of a per-layer statistic whose customdata is [layer label, median, ci_low, ci_high]."""
    return (f"<b>{_text(model)}</b><br>%{{customdata[0]}}<br>{value} %{{y:.4g}}"
            "<br>median %{customdata[1]:.4g}<br>CI [%{customdata[2]:.4g}, %{customdata[3]:.4g}]<extra></extra>")


def log_ticks(values) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis spanning the finite positive `values`: 1, 2, 5 × 10^e
    (only the powers of ten past three decades), as plain decimals down to 0.001 and as 10^e below."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return [], []
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    steps = (1,) if hi - lo > 3 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in steps]
    ticks = [t for t in ticks if v.min() / 2 <= t <= v.max() * 2]
    return ticks, [_tick_text(t) for t in ticks]


def _tick_text(t: float) -> str:
    if t >= 1e-3:
        return f"{t:g}"
    mant, exp = f"{t:.0e}".split("e")
    head = "" if mant == "1" else f"{mant}×"
    return f"{head}10<sup>{int(exp)}</sup>"


# --------------------------------------------------------------------------------------- figures


def needle_prob_figure(summary: pd.DataFrame, log_scale: bool = False) -> go.Figure:
    """Mean needle probability per layer, one colour per model, with CI whiskers.

    The paper's Figure 6 layout (docs/conventions.md, "Lens and SNR"): grouped bars on a linear axis;
    with ``log_scale=True`` points with whiskers on a log axis (bars from an arbitrary floor would
    exaggerate the gaps), which makes the early layers (probabilities near 0) readable.
    """
    check_columns(summary, REPORT_SUMMARY_COLUMNS, "summary")
    sub = _select_measure(summary, "prob", "summary")
    models = _unique(sub["model"])
    colours = _model_colours(models)
    fig = go.Figure()
    for m in models:
        d = sub[sub["model"] == m]
        mean, lo, hi = _floats(d["mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
        common = dict(name=_text(m), x=d["layer"].tolist(), y=mean.tolist(),
                      error_y=dict(type="data", symmetric=False, array=_err(hi, mean), arrayminus=_err(mean, lo),
                                   thickness=1.2, width=3 if log_scale else 2, color=colours[m] if log_scale else None),
                      customdata=_custom(d["layer"].map(layer_label), _floats(d["median"]), lo, hi),
                      hovertemplate=_stat_hover(m))
        if log_scale:
            fig.add_trace(go.Scatter(mode="markers", marker=dict(size=9, color=colours[m]), offsetgroup=str(m), **common))
        else:
            fig.add_trace(go.Bar(marker_color=colours[m], **common))
    if log_scale:
        fig.update_layout(scattermode="group", scattergap=0.5)
    else:
        fig.update_layout(barmode="group", bargap=0.15, bargroupgap=0.05)
    scale = "log scale" if log_scale else "linear scale"
    mark = "point" if log_scale else "bar"
    how = (f"Each {mark} is the lens probability of the needle (answer) token at the last prompt position, "
           f"averaged over examples; whiskers are the confidence interval. A higher {mark} at a layer means "
           "that model has already surfaced the answer there"
           + (" — the log axis spreads out the near-zero early layers." if log_scale else "."))
    _finish(fig, title=f"Needle probability per layer ({scale})", how=how,
            xlabel=LAYER_AXIS, ylabel="mean needle probability")
    if log_scale:
        tickvals, ticktext = log_ticks(np.r_[_floats(sub["mean"]), _floats(sub["ci_low"]), _floats(sub["ci_high"])])
        fig.update_yaxes(type="log", tickmode="array", tickvals=tickvals, ticktext=ticktext)
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def measure_curves_figure(summary: pd.DataFrame, measure: str) -> go.Figure:
    """Per-layer curves of ``measure`` (mean, one line per model) with shaded CI bands.

    Two traces per model: the band (a closed polygon, not in the legend) then the mean line.
    """
    check_columns(summary, REPORT_SUMMARY_COLUMNS, "summary")
    sub = _select_measure(summary, measure, "summary")
    models = _unique(sub["model"])
    colours = _model_colours(models)
    label = _measure_label(measure)
    fig = go.Figure()
    for m in models:
        d = sub[sub["model"] == m]
        x = d["layer"].to_numpy()
        mean, lo, hi = _floats(d["mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
        ok = np.isfinite(lo) & np.isfinite(hi)
        fig.add_trace(go.Scatter(
            x=np.concatenate([x[ok], x[ok][::-1]]).tolist(),
            y=np.concatenate([hi[ok], lo[ok][::-1]]).tolist(),
            fill="toself", fillcolor=_rgba(colours[m], 0.18), line=dict(width=0),
            mode="lines", hoverinfo="skip", showlegend=False, legendgroup=str(m),
            name=f"{_text(m)} CI",
        ))
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=mean.tolist(), mode="lines+markers", name=_text(m),
            legendgroup=str(m), line=dict(color=colours[m], width=2), marker=dict(size=5),
            customdata=_custom(d["layer"].map(layer_label), _floats(d["median"]), lo, hi),
            hovertemplate=_stat_hover(m),
        ))
    direction = _MEASURE_HOW.get(measure, "compare the models layer by layer")
    how = (f"Lines are the per-layer mean {label} for each model and shaded bands the confidence "
           f"interval; {direction}. Where bands do not overlap the models differ at that layer.")
    _finish(fig, title=f"{label[0].upper()}{label[1:]} per layer", how=how,
            xlabel=LAYER_AXIS, ylabel=label)
    if measure == "distractor_ratio":
        fig.add_hline(y=1.0, line=dict(color="#888", dash="dot", width=1))
        lows = _floats(sub["ci_low"])
        if np.isfinite(lows).any() and np.nanmin(lows) > 0:  # a ratio: log axis when possible
            fig.update_yaxes(type="log")
            fig.layout.meta = {"how_to_read": how + " The y axis is logarithmic (dotted line = 1)."}
    if measure == "distractor_log_ratio":
        fig.add_hline(y=0.0, line=dict(color="#888", dash="dot", width=1))
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def _significant(d: pd.DataFrame, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The rows' `significant` column when there is one (it also asks for enough stories), else: the
    interval excludes 0 and has positive width. A zero-width interval is never significant."""
    width = hi > lo
    if "significant" in d.columns:
        flag = d["significant"].astype("boolean").fillna(False).to_numpy(dtype=bool)
        return flag & width
    return ((lo > 0) | (hi < 0)) & width


def paired_direction(measure: str, a: str, b: str) -> str:
    """What a point above the zero line means for `measure` (b − a), in words."""
    if measure in LOWER_IS_BETTER:
        return (f"above the zero line {b} gives the needle a larger {_measure_label(measure)} than {a}, "
                "i.e. reads it worse (lower is better)")
    if measure in _MEASURE_HOW:
        return f"above the zero line {b} is higher than {a}, i.e. reads the needle better"
    return f"above the zero line {b} is higher than {a}"


def paired_figure(paired: pd.DataFrame, measure: str = "prob") -> go.Figure:
    """Per-layer paired difference (model_b − model_a) with CI whiskers and a zero line.

    Per (model_a, model_b) pair: a line with the whiskers (named "b − a", in the legend) and its
    markers (filled: significant, i.e. the `significant` column, or an interval of positive width
    that excludes 0 when there is none; open: not), in the same legend group.
    """
    check_columns(paired, REPORT_PAIRED_COLUMNS, "paired")
    sub = _select_measure(paired, measure, "paired")
    pairs = _unique(zip(sub["model_a"], sub["model_b"]))
    label = _measure_label(measure)
    fig = go.Figure()
    for k, (a, b) in enumerate(pairs):
        d = sub[(sub["model_a"] == a) & (sub["model_b"] == b)]
        _paired_traces(fig, d, f"{_text(b)} − {_text(a)}", _MODEL_COLOURS[(k + 2) % len(_MODEL_COLOURS)])
    fig.add_hline(y=0.0, line=dict(color="#333", width=1))
    fig.update_layout(showlegend=True)
    names = "; ".join(f"{b} − {a}" for a, b in pairs)
    a, b = pairs[0]
    how = (f"Each point is the mean per-example difference in {label} ({names}) at that layer, with its "
           f"confidence interval; {paired_direction(measure, a, b)}. Filled markers: significant (the interval "
           "excludes zero, has positive width and rests on enough stories); open markers: not.")
    if measure == "distractor_ratio":
        how += (" Differences of raw ratios are dominated by a few huge values: read the log-ratio's "
                "difference (distractor_log_ratio) instead.")
    _finish(fig, title=f"Paired difference in {label} per layer", how=how,
            xlabel=LAYER_AXIS, ylabel=f"Δ {label} (b − a)")
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def _paired_traces(fig: go.Figure, d: pd.DataFrame, name: str, colour: str) -> None:
    """The line with whiskers (in the legend) and the significance markers (not) of one pair."""
    diff, lo, hi = _floats(d["diff_mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
    significant = _significant(d, lo, hi)
    x = d["layer"].tolist()
    fig.add_trace(go.Scatter(
        x=x, y=diff.tolist(), mode="lines", name=name, legendgroup=name, line=dict(color=colour, width=1.5),
        error_y=dict(type="data", symmetric=False, array=_err(hi, diff), arrayminus=_err(diff, lo),
                     thickness=1.2, width=3, color=colour),
        hoverinfo="skip"))
    fig.add_trace(go.Scatter(
        x=x, y=diff.tolist(), mode="markers", name=f"{name} (significance)", legendgroup=name, showlegend=False,
        marker=dict(size=9, color=colour, line=dict(color=colour, width=1.5),
                    symbol=["circle" if s else "circle-open" for s in significant]),
        customdata=_custom(d["layer"].map(layer_label), lo, hi, np.where(significant, "significant", "not significant")),
        hovertemplate=(f"<b>{name}</b><br>%{{customdata[0]}}<br>difference %{{y:.4g}}"
                       "<br>CI [%{customdata[1]:.4g}, %{customdata[2]:.4g}] (%{customdata[3]})<extra></extra>")))


def _branch_components(df: pd.DataFrame) -> list:
    present = _unique(df["component"])
    return [c for c in BRANCH_COMPONENTS if c in present] + [c for c in present if c not in BRANCH_COMPONENTS]


def branch_figure(branch: pd.DataFrame) -> go.Figure:
    """Per differential layer, grouped bars of the direct logit contribution of each component.

    One subplot row per model (shared x axis); within a row one bar trace per component the model
    has ("mixer_1", "-λ·mixer_2", "block", then any others). A component's first trace carries its
    legend entry (whichever row it first appears in), so the legend names every component once.
    """
    check_columns(branch, BRANCH_COLUMNS, "branch")
    if branch.empty:
        raise DiffMambaError("branch has no rows")
    df = branch.copy()
    df["layer"] = pd.to_numeric(df["layer"], errors="raise").astype(int)
    df = df.sort_values("layer", kind="stable")
    models = _unique(df["model"])
    components = _branch_components(df)
    extra = iter(_EXTRA_COMPONENT_COLOURS * 4)
    colours = {c: _COMPONENT_COLOURS.get(c) or next(extra, "#999999") for c in components}
    rows = len(models)
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08 if rows > 1 else 0,
                        subplot_titles=[_text(m) for m in models])
    named: set = set()
    for r, m in enumerate(models, start=1):
        dm = df[df["model"] == m]
        for c in components:
            d = dm[dm["component"] == c]
            if d.empty:
                continue
            fig.add_trace(go.Bar(
                name=_text(c), x=d["layer"].tolist(), y=_floats(d["value"]).tolist(),
                marker_color=colours[c], legendgroup=str(c), showlegend=c not in named,
                customdata=_custom(d["layer"].map(block_label)),
                hovertemplate=(f"<b>{_text(m)}</b> · {_text(c)}<br>%{{customdata[0]}}"
                               "<br>direct logit %{y:.4g}<extra></extra>"),
            ), row=r, col=1)
            named.add(c)
        fig.update_yaxes(title_text="direct logit to target", row=r, col=1)
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_xaxes(title_text=BLOCK_AXIS, row=rows, col=1)
    how = ("For each differential block, the bars split its direct contribution to the target "
           "token's logit into the first branch (mixer_1), the subtracted second branch "
           "(−λ·mixer_2) and the whole block output (a plain block has only the last); a large negative "
           "−λ·mixer_2 bar means the second branch cancels signal the first one wrote.")
    _finish(fig, title="Branch decomposition: direct logit contribution per block",
            how=how, xlabel=None, ylabel=None, height=max(380, 300 * rows + 100))
    return fig


def _token_label(tok, limit: int | None = None) -> str:
    """A token as an axis label: whitespace made visible, cut to `limit` characters (then "…"), escaped."""
    s = str(tok).replace("\r", "\\r").replace("\n", "↵").replace("\t", "⇥")
    s = s if s.strip() else (s.replace(" ", "␣") or "∅")
    if limit is not None and len(s) > limit:
        s = s[:limit - 1] + "…"
    return _text(s)


def _attention_arrays(entry) -> tuple[dict, list]:
    """The entry's maps as float arrays [n, n] (checked against its n tokens) and its tokens."""
    if not isinstance(entry, Mapping):
        raise DiffMambaError(f"attention entry must be a dict, got {type(entry).__name__}")
    missing = [k for k in ("title", "maps", "tokens") if k not in entry]
    if missing:
        raise DiffMambaError(f"attention entry is missing key(s): {', '.join(missing)}")
    maps, tokens = entry["maps"], list(entry["tokens"])
    if not isinstance(maps, Mapping) or not maps:
        raise DiffMambaError("attention entry 'maps' must be a non-empty dict name -> 2-D array")
    n = len(tokens)
    arrays = {}
    for name, a in maps.items():
        arr = np.asarray(a, dtype=float)
        if arr.shape != (n, n):
            raise DiffMambaError(
                f"attention map {name!r} has shape {arr.shape}, expected ({n}, {n}) "
                f"to match {n} tokens")
        arrays[str(name)] = arr
    return arrays, tokens


def attention_range(maps: Iterable) -> tuple[float, float]:
    """One colour range (zmin, zmax) for maps to be compared: ±max|value| (symmetric around 0) when
    any value is negative, else 0..max."""
    finite = [z[np.isfinite(z)] for z in (np.asarray(m, dtype=float) for m in maps)]
    finite = np.concatenate(finite) if finite else np.zeros(0)
    if not finite.size:
        return -1.0, 1.0
    if finite.min() < 0:
        m = float(np.abs(finite).max())
        return -m, m
    top = float(finite.max())
    return 0.0, top if top > 0 else 1.0


def attention_figure(entry: Mapping, zrange: tuple[float, float] | None = None) -> go.Figure:
    """Heatmaps side by side, one per map in ``entry["maps"]``, token labels on both axes.

    Rows are the query (target) position t, columns the source position s. Every panel shares one
    colour axis (one colour bar): `zrange` (zmin, zmax), by default `attention_range` of the entry's
    maps — diverging and symmetric around 0 when a map holds negative values, sequential otherwise.
    Give several figures one `zrange` to compare them by eye. x tick labels stand upright and are
    thinned per panel so that neighbouring panels' labels never overlap.
    """
    arrays, tokens = _attention_arrays(entry)
    names = list(arrays)
    zmin, zmax = zrange if zrange is not None else attention_range(arrays.values())
    diverging = zmin < 0
    n, ncols = len(tokens), len(names)
    cats = _position_categories(tokens)
    xticks = list(range(0, n, max(1, math.ceil(n / max(8, 72 // ncols)))))
    longest = max((min(len(str(tokens[i])), 12) for i in xticks), default=1)
    height, bottom = int(min(900, max(420, 260 + 8 * min(n, 60) + 7 * longest))), 60 + 7 * longest
    rows_fit = max(8, (height - 90 - bottom) // 13)  # a y label needs ~13 px
    yticks = list(range(0, n, max(1, math.ceil(n / rows_fit))))
    fig = make_subplots(rows=1, cols=ncols, shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[_text(nm) for nm in names])
    for j, nm in enumerate(names, start=1):
        fig.add_trace(go.Heatmap(z=arrays[nm].tolist(), x=cats, y=cats, name=_text(nm), coloraxis="coloraxis",
                                 xgap=0, ygap=0, hovertemplate=("query %{y}<br>source %{x}<br>value %{z:.4g}<extra>"
                                                                + _text(nm) + "</extra>")), row=1, col=j)
        fig.update_xaxes(type="category", tickmode="array", tickvals=[cats[i] for i in xticks],
                         ticktext=[_token_label(tokens[i], 12) for i in xticks], tickangle=-90, tickfont=dict(size=10),
                         title_text="source position s", showgrid=False, row=1, col=j)
    fig.update_yaxes(type="category", tickmode="array", tickvals=[cats[i] for i in yticks], tickfont=dict(size=10),
                     ticktext=[_token_label(tokens[i], 16) for i in yticks], autorange="reversed", showgrid=False)
    fig.update_yaxes(title_text="query position t", row=1, col=1)
    fig.update_layout(coloraxis=dict(colorscale=_DIVERGING if diverging else _SEQUENTIAL, cmin=zmin, cmax=zmax,
                                     colorbar=dict(thickness=12, len=0.85, tickfont=dict(size=10))))
    _finish(fig, title=_text(entry["title"]), how=_attention_how(names, diverging), xlabel=None, ylabel=None,
            height=height)
    fig.update_layout(margin=dict(l=70 + 6 * min(longest, 16), r=40, t=90, b=bottom))
    return fig


def _position_categories(tokens: Sequence) -> list[str]:
    """One distinct axis category per position, which the hover shows: the labels themselves when they
    are distinct (e.g. the position ranges of averaged maps), else "position: token". Categories keep
    token text out of every cell (a text per cell would grow the page with the square of the length)."""
    labels = [_token_label(t) for t in tokens]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{i}: {label}" for i, label in enumerate(labels)]


def _attention_how(names: Sequence[str], diverging: bool) -> str:
    """The reading guide of an attention figure: the differential sentence only when it has that map."""
    how = ("Row t, column s is how much position s feeds position t (implicit attention, causal: only s ≤ t). "
           + ("All panels share one colour scale centred at 0: red adds to the output, blue takes away."
              if diverging else "All panels share one colour scale from 0 (dark purple) to the largest value (yellow)."))
    if any("diff" in n.lower() for n in names):
        how += (" The differential map is branch 1 − λ·branch 2, so noise shared by both branches "
                "should fade there.")
    return how


def patching_effects(result) -> np.ndarray:
    """The colour values of `patching_figure`: the normalized effect, or the metric − corrupted."""
    use_norm = bool(np.isfinite(result.frame["normalized"]).any())
    z = result.grid("normalized" if use_norm else "value").to_numpy(dtype=float)
    return z if use_norm else z - result.corrupt_metric


def _paper_block(row_label) -> str:
    """" (the paper's layer i)" for a patching row "block i · …" (block i is the paper's layer i), else ""."""
    import re

    found = re.match(r"block (\d+)\b", str(row_label))
    return f" (the paper's layer {found.group(1)})" if found else ""


PATCHING_MAX_COLUMNS = 256  # position columns of a patching heat-map; longer grids are downsampled to this


def _largest_per_block(z: np.ndarray, k: int) -> np.ndarray:
    """Per row and block of k consecutive columns, the column index of the cell of largest |z| (NaN
    cells never win unless the whole block is NaN): int [rows, ceil(cols / k)]."""
    rows, cols = z.shape
    n = -(-cols // k)
    mag = np.full((rows, n * k), -1.0)
    mag[:, :cols] = np.where(np.isfinite(z), np.abs(z), -1.0)
    pick = mag.reshape(rows, n, k).argmax(-1)
    return np.minimum(pick + np.arange(n)[None, :] * k, cols - 1)


def patching_figure(result, zmax: float | None = None, max_columns: int = PATCHING_MAX_COLUMNS) -> go.Figure:
    """A patching grid (`analysis.patching.PatchingResult`) as one heat-map: rows "block i · component",
    columns positions (labelled with the corrupted prompt's tokens). The colour is the normalized
    effect (value − corrupted) / (clean − corrupted) on a scale centred at 0 (1 = the clean metric
    restored), or the raw metric when the two runs give the same value. zmax: the colour range ±zmax
    (give several figures one range to compare them; default: this grid's largest |value|).

    Past `max_columns` positions the columns are downsampled: blocks of k = ceil(positions / max_columns)
    consecutive positions, each column showing the cell of its block with the largest |effect| (signed;
    a single strong position is never averaged away), at most `max_columns` columns; the title and the
    reading guide say so and the hover names the position shown."""
    df = result.frame
    if df.empty:
        raise DiffMambaError("the patching result has no cells")
    use_norm = bool(np.isfinite(df["normalized"]).any())
    column = "normalized" if use_norm else "value"
    grid = result.grid(column)
    z = patching_effects(result)
    positions = [int(p) for p in grid.columns]
    labels = [f"{p}: {_token_label(result.tokens[p])}" if p < len(result.tokens) else str(p) for p in positions]
    finite = z[np.isfinite(z)]
    m = zmax if zmax is not None else (float(np.abs(finite).max()) if finite.size else 1.0)
    m = m if m > 0 else 1.0
    raw = result.grid("value").to_numpy(dtype=float)
    rows = np.array([_paper_block(r) for r in grid.index], dtype=object)[:, None]
    cell_labels = np.broadcast_to(np.array(labels, dtype=object)[None, :], z.shape)
    k = max(1, math.ceil(len(positions) / max(1, int(max_columns))))
    if k > 1:  # downsampled: each column the largest |effect| of a block of k positions
        pick = _largest_per_block(z, k)
        z, raw = np.take_along_axis(z, pick, 1), np.take_along_axis(raw, pick, 1)
        starts = list(range(0, len(positions), k))
        spans = [f"{positions[a]}–{positions[min(a + k, len(positions)) - 1]}" for a in starts]
        cell_labels = np.array([[f"{labels[j]} (largest in {spans[c]})" for c, j in enumerate(r)] for r in pick],
                               dtype=object)
        labels = spans
    step = max(1, math.ceil(len(labels) / 60))
    custom = np.stack([raw, *np.broadcast_arrays(cell_labels, rows)], -1)
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(range(len(labels))), y=list(grid.index), colorscale=_DIVERGING, zmin=-m, zmax=m,
        name=f"{result.method} patching", customdata=custom,
        colorbar=dict(title=dict(text="normalized effect" if use_norm else "metric − corrupted", side="right")),
        hovertemplate="%{y}%{customdata[2]}<br>position %{customdata[1]}<br>" + ("effect %{z:.3f}" if use_norm else "Δ %{z:.4g}")
                      + "<br>" + _text(result.metric) + " %{customdata[0]:.4g}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(0, len(labels), step)),
                     ticktext=labels[::step], tickangle=-60, showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    how = (f"Each cell is the {result.metric} of the corrupted run with one {result.what} value at one position taken "
           f"from the clean run ({result.method}); 1 (red) = the clean result restored, 0 (white) = no effect, "
           f"blue = pushed the other way. Clean {result.clean_metric:.4g}, corrupted {result.corrupt_metric:.4g}.")
    kind = "Attribution" if result.method == "attribution" else "State" if result.what == "state" else "Activation"
    title = _text(f"{kind} patching: {result.what} → {result.metric}")
    xlabel = "position (corrupted prompt's token)"
    if k > 1:
        title += (f"<br><sup>{len(positions):,} positions downsampled to {len(labels)} columns: each column is a block of "
                  f"{k} positions showing its largest |effect|</sup>")
        how += (f" The {len(positions):,} positions are downsampled to {len(labels)} columns (at most {max_columns}): each "
                f"column covers {k} consecutive positions and shows the cell of largest |effect| among them (the hover "
                "names that position; `diffmamba-interp patch --csv` keeps every cell).")
        xlabel = f"positions, in blocks of {k} (corrupted prompt)"
    _finish(fig, title=title, how=how, xlabel=xlabel, ylabel=None,
            height=int(min(1200, max(360, 160 + 22 * len(grid.index)))))
    fig.update_layout(showlegend=False)
    return fig
