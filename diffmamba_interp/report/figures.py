"""Plotly figure builders for the report, working purely from DataFrames / numpy arrays.

Every builder returns a ``plotly.graph_objects.Figure`` with a title and axis labels, and keeps a
one-sentence "how to read this" note in ``fig.layout.meta["how_to_read"]`` (read it back with
:func:`how_to_read`). Layer numbering follows docs/conventions.md, "Lens and SNR": layer 0 = embeddings, layer k = residual
stream after block k; the branch figure uses block indices i (block i writes into layer i + 1).

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
    "patching_figure",
]


MEASURE_LABELS = {
    "prob": "needle probability",
    "logprob": "needle log-probability",
    "rank": "rank of the needle token",
    "snr_db": "signal-to-noise ratio (dB)",
    "distractor_ratio": "needle / best-distractor probability ratio",
}
_MEASURE_HOW = {
    "prob": "higher = the lens puts more mass on the needle token",
    "logprob": "higher (closer to 0) = more mass on the needle token",
    "rank": "lower = the needle token is nearer the top of the lens distribution (1 = top)",
    "snr_db": "higher = the needle stands out more from the rest of the distribution",
    "distractor_ratio": "above 1 = the needle beats the strongest distractor",
}

LAYER_AXIS = "layer (0 = embeddings, k = residual after block k)"
BLOCK_AXIS = "block index i (0-based; block i writes into layer i + 1)"

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
    return MEASURE_LABELS.get(measure, measure)


# --------------------------------------------------------------------------------------- figures


def needle_prob_figure(summary: pd.DataFrame, log_scale: bool = False) -> go.Figure:
    """Grouped bars per layer, one colour per model: mean needle probability with CI whiskers.

    The paper's Figure 6 layout (docs/conventions.md, "Lens and SNR"). ``log_scale=True`` puts the y axis on a log scale,
    which makes the early layers (probabilities near 0) readable.
    """
    check_columns(summary, REPORT_SUMMARY_COLUMNS, "summary")
    sub = _select_measure(summary, "prob", "summary")
    models = _unique(sub["model"])
    colours = _model_colours(models)
    fig = go.Figure()
    for m in models:
        d = sub[sub["model"] == m]
        mean, lo, hi = _floats(d["mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
        fig.add_trace(go.Bar(
            name=_text(m), x=d["layer"].tolist(), y=mean.tolist(),
            marker_color=colours[m],
            error_y=dict(type="data", symmetric=False, array=_err(hi, mean),
                         arrayminus=_err(mean, lo), thickness=1.2, width=2),
            customdata=np.stack([_floats(d["median"]), lo, hi], axis=-1),
            hovertemplate=(f"<b>{_text(m)}</b><br>layer %{{x}}<br>mean %{{y:.4g}}"
                           "<br>median %{customdata[0]:.4g}"
                           "<br>CI [%{customdata[1]:.4g}, %{customdata[2]:.4g}]<extra></extra>"),
        ))
    fig.update_layout(barmode="group", bargap=0.15, bargroupgap=0.05)
    scale = "log scale" if log_scale else "linear scale"
    how = ("Each bar is the lens probability of the needle (answer) token at the last prompt "
           "position, averaged over examples; whiskers are the confidence interval. Higher bars "
           "at a layer mean that model has already surfaced the answer there"
           + (" — the log axis spreads out the near-zero early layers." if log_scale else "."))
    _finish(fig, title=f"Needle probability per layer ({scale})", how=how,
            xlabel=LAYER_AXIS, ylabel="mean needle probability")
    if log_scale:
        fig.update_yaxes(type="log")
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def _layer_dtick(layers) -> int:
    n = int(pd.Series(layers).nunique())
    return max(1, math.ceil(n / 25))


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
            customdata=np.stack([_floats(d["median"]), lo, hi], axis=-1),
            hovertemplate=(f"<b>{_text(m)}</b><br>layer %{{x}}<br>mean %{{y:.4g}}"
                           "<br>median %{customdata[0]:.4g}"
                           "<br>CI [%{customdata[1]:.4g}, %{customdata[2]:.4g}]<extra></extra>"),
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
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def paired_figure(paired: pd.DataFrame, measure: str = "prob") -> go.Figure:
    """Per-layer paired difference (model_b − model_a) with CI whiskers and a zero line.

    One trace per (model_a, model_b) pair. Filled markers: the CI excludes 0; open markers: it
    does not.
    """
    check_columns(paired, REPORT_PAIRED_COLUMNS, "paired")
    sub = _select_measure(paired, measure, "paired")
    pairs = _unique(zip(sub["model_a"], sub["model_b"]))
    label = _measure_label(measure)
    fig = go.Figure()
    for k, (a, b) in enumerate(pairs):
        d = sub[(sub["model_a"] == a) & (sub["model_b"] == b)]
        diff, lo, hi = _floats(d["diff_mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
        significant = (lo > 0) | (hi < 0)
        colour = _MODEL_COLOURS[(k + 2) % len(_MODEL_COLOURS)]
        fig.add_trace(go.Scatter(
            x=d["layer"].tolist(), y=diff.tolist(), mode="lines+markers",
            name=f"{_text(b)} − {_text(a)}",
            line=dict(color=colour, width=1.5),
            marker=dict(size=8, color=colour,
                        symbol=["circle" if s else "circle-open" for s in significant]),
            error_y=dict(type="data", symmetric=False, array=_err(hi, diff),
                         arrayminus=_err(diff, lo), thickness=1.2, width=3, color=colour),
            customdata=np.stack([lo, hi], axis=-1),
            hovertemplate=(f"<b>{_text(b)} − {_text(a)}</b><br>layer %{{x}}"
                           "<br>difference %{y:.4g}"
                           "<br>CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>"),
        ))
    fig.add_hline(y=0.0, line=dict(color="#333", width=1))
    fig.update_layout(showlegend=True)
    names = "; ".join(f"{b} − {a}" for a, b in pairs)
    how = (f"Each point is the mean per-example difference in {label} ({names}) at that layer, "
           "with its confidence interval; above the zero line the second model is higher, and "
           "filled markers mark layers whose interval excludes zero.")
    _finish(fig, title=f"Paired difference in {label} per layer", how=how,
            xlabel=LAYER_AXIS, ylabel=f"Δ {label} (b − a)")
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def branch_figure(branch: pd.DataFrame) -> go.Figure:
    """Per differential layer, grouped bars of the direct logit contribution of each component.

    One subplot row per model (shared x axis); within a row one bar trace per component
    ("mixer_1", "-λ·mixer_2", "block", then any others), so there are n_models × n_components
    traces and the legend lists each component once.
    """
    check_columns(branch, BRANCH_COLUMNS, "branch")
    if branch.empty:
        raise DiffMambaError("branch has no rows")
    df = branch.copy()
    df["layer"] = pd.to_numeric(df["layer"], errors="raise").astype(int)
    df = df.sort_values("layer", kind="stable")
    models = _unique(df["model"])
    present = _unique(df["component"])
    components = [c for c in BRANCH_COMPONENTS if c in present] + \
                 [c for c in present if c not in BRANCH_COMPONENTS]
    extra = iter(_EXTRA_COMPONENT_COLOURS * 4)
    colours = {c: _COMPONENT_COLOURS.get(c) or next(extra, "#999999") for c in components}
    rows = len(models)
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08 if rows > 1 else 0,
                        subplot_titles=[_text(m) for m in models])
    for r, m in enumerate(models, start=1):
        dm = df[df["model"] == m]
        for c in components:
            d = dm[dm["component"] == c]
            fig.add_trace(go.Bar(
                name=_text(c), x=d["layer"].tolist(), y=_floats(d["value"]).tolist(),
                marker_color=colours[c], legendgroup=str(c), showlegend=(r == 1),
                hovertemplate=(f"<b>{_text(m)}</b> · {_text(c)}<br>block %{{x}}"
                               "<br>direct logit %{y:.4g}<extra></extra>"),
            ), row=r, col=1)
        fig.update_yaxes(title_text="direct logit to target", row=r, col=1)
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_xaxes(title_text=BLOCK_AXIS, row=rows, col=1)
    how = ("For each differential block, the bars split its direct contribution to the target "
           "token's logit into the first branch (mixer_1), the subtracted second branch "
           "(−λ·mixer_2) and the whole block output; a large negative −λ·mixer_2 bar means the "
           "second branch cancels signal the first one wrote.")
    _finish(fig, title="Branch decomposition: direct logit contribution per differential block",
            how=how, xlabel=None, ylabel=None, height=max(380, 300 * rows + 100))
    return fig


def _token_label(tok) -> str:
    s = str(tok).replace("\r", "\\r").replace("\n", "↵").replace("\t", "⇥")
    return _text(s) if s.strip() else (_text(s.replace(" ", "␣")) or "∅")


def attention_figure(entry: Mapping) -> go.Figure:
    """Heatmaps side by side, one per map in ``entry["maps"]``, token labels on both axes.

    Rows are the query (target) position t, columns the source position s. Maps whose name
    contains "diff" (the differential map), or that hold negative values, use a diverging colour
    scale centred at 0 (symmetric zmin/zmax); the others use a sequential scale.
    """
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
    names = list(arrays)
    ncols = len(names)
    labels = [_token_label(t) for t in tokens]
    step = max(1, math.ceil(n / 40))
    tickvals = list(range(0, n, step))
    ticktext = [labels[i] for i in tickvals]
    hover_tokens = n <= 256
    cb_space = 0.07
    fig = make_subplots(rows=1, cols=ncols, shared_yaxes=True, horizontal_spacing=cb_space + 0.02,
                        subplot_titles=[_text(nm) for nm in names])
    for j, nm in enumerate(names, start=1):
        z = arrays[nm]
        finite = z[np.isfinite(z)]
        diverging = "diff" in nm.lower() or (finite.size > 0 and finite.min() < 0)
        xdomain = fig.layout[f"xaxis{'' if j == 1 else j}"].domain
        kw = dict(colorbar=dict(x=xdomain[1] + 0.005, xanchor="left", thickness=10, len=0.85,
                                y=0.46, yanchor="middle", tickfont=dict(size=10)))
        if diverging:
            m = float(np.abs(finite).max()) if finite.size else 1.0
            m = m if m > 0 else 1.0
            kw.update(colorscale=_DIVERGING, zmin=-m, zmax=m)
        else:
            kw.update(colorscale=_SEQUENTIAL)
        if hover_tokens:
            tok = np.array(labels, dtype=object)
            custom = np.stack(np.broadcast_arrays(tok[:, None], tok[None, :]), axis=-1)
            kw.update(customdata=custom,
                      hovertemplate=("query %{y} %{customdata[0]}<br>source %{x} "
                                     "%{customdata[1]}<br>value %{z:.4g}<extra>"
                                     + _text(nm) + "</extra>"))
        else:
            kw.update(hovertemplate="query %{y}<br>source %{x}<br>value %{z:.4g}<extra></extra>")
        fig.add_trace(go.Heatmap(z=z.tolist(), x=list(range(n)), y=list(range(n)), name=_text(nm),
                                 xgap=0, ygap=0, **kw), row=1, col=j)
        fig.update_xaxes(tickmode="array", tickvals=tickvals, ticktext=ticktext, tickangle=-60,
                         title_text="source position s", showgrid=False, row=1, col=j)
    fig.update_yaxes(tickmode="array", tickvals=tickvals, ticktext=ticktext,
                     autorange="reversed", showgrid=False)
    fig.update_yaxes(title_text="query position t", row=1, col=1)
    how = ("Row t, column s is how much position s feeds position t (implicit attention, causal: "
           "only s ≤ t); the differential map is branch 1 − λ·branch 2 on a colour scale centred "
           "at 0 — red adds to the output, blue is cancelled — so noise shared by both branches "
           "should fade there.")
    longest = max((len(t) for t in ticktext), default=1)
    _finish(fig, title=_text(entry["title"]), how=how, xlabel=None, ylabel=None,
            height=int(min(900, max(420, 300 + 8 * min(n, 60) + 6 * longest))))
    fig.update_layout(margin=dict(l=70 + 5 * min(longest, 20), r=60, t=90, b=60 + 6 * min(longest, 20)))
    return fig


def patching_effects(result) -> np.ndarray:
    """The colour values of `patching_figure`: the normalized effect, or the metric − corrupted."""
    use_norm = bool(np.isfinite(result.frame["normalized"]).any())
    z = result.grid("normalized" if use_norm else "value").to_numpy(dtype=float)
    return z if use_norm else z - result.corrupt_metric


def patching_figure(result, zmax: float | None = None) -> go.Figure:
    """A patching grid (`analysis.patching.PatchingResult`) as one heat-map: rows "block i · component",
    columns positions (labelled with the corrupted prompt's tokens). The colour is the normalized
    effect (value − corrupted) / (clean − corrupted) on a scale centred at 0 (1 = the clean metric
    restored), or the raw metric when the two runs give the same value. zmax: the colour range ±zmax
    (give several figures one range to compare them; default: this grid's largest |value|)."""
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
    step = max(1, math.ceil(len(positions) / 60))
    raw = result.grid("value").to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(range(len(positions))), y=list(grid.index), colorscale=_DIVERGING, zmin=-m, zmax=m,
        name=f"{result.method} patching", customdata=np.stack([raw, np.broadcast_to(np.array(labels, dtype=object), raw.shape)], -1),
        colorbar=dict(title=dict(text="normalized effect" if use_norm else "metric − corrupted", side="right")),
        hovertemplate="%{y}<br>position %{customdata[1]}<br>" + ("effect %{z:.3f}" if use_norm else "Δ %{z:.4g}")
                      + "<br>" + _text(result.metric) + " %{customdata[0]:.4g}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(0, len(positions), step)),
                     ticktext=labels[::step], tickangle=-60, showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    how = (f"Each cell is the {result.metric} of the corrupted run with one {result.what} value at one position taken "
           f"from the clean run ({result.method}); 1 (red) = the clean result restored, 0 (white) = no effect, "
           f"blue = pushed the other way. Clean {result.clean_metric:.4g}, corrupted {result.corrupt_metric:.4g}.")
    kind = "Attribution" if result.method == "attribution" else "State" if result.what == "state" else "Activation"
    title = f"{kind} patching: {result.what} → {result.metric}"
    _finish(fig, title=_text(title), how=how, xlabel="position (corrupted prompt's token)", ylabel=None,
            height=int(min(1200, max(360, 160 + 22 * len(grid.index)))))
    fig.update_layout(showlegend=False)
    return fig
