"""Accuracy by context length as heat-maps: the `eval` command's page and the full report's section.

- `accuracy_heatmap_figure(table, scorer)`: accuracy by task (rows) × context length (columns), one
  panel per model, one colour scale from 0 to 1 (the paper's BABILong heat-maps).
- `accuracy_ratio_figure(table, model_a, model_b, scorer)`: accuracy of b / accuracy of a per cell
  (the paper's comparison figure), coloured on a log scale centred at 1 (blue: b better; red: a
  better); the ratio itself is in each cell's text and in ``customdata[0]``.
- `accuracy_figures(table, baseline)`: both, for every scorer that was run, each model after the
  first (or `baseline`) against it, grouped under their headings in page order; `accuracy_wide_table`
  the same numbers as one row per task × length.
- `write_accuracy_report(path, table, ...)`: those figures and the tables on one self-contained page
  (`page._Page`: plotly.js embedded once); `length_accuracy_section(page, table)`: the same figures and
  the wide table as one section of the full report (`html.write_report(length_accuracy=...)`).

``table`` is `analysis.accuracy.TABLE_COLUMNS` (model, task, length, n, accuracy_argmax, ... ).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DiffMambaError
from ..files import write_atomic
from ..schemas import check_columns
from .figures import _finish, _text, _unique
from .page import _meta_block, _Page

__all__ = ["accuracy_heatmap_figure", "accuracy_ratio_figure", "accuracy_figures", "accuracy_wide_table",
           "write_accuracy_report", "length_accuracy_section", "length_label", "SCORER_TITLES", "TABLE_REQUIRED"]

TABLE_REQUIRED = ("model", "task", "length", "n", "accuracy_argmax", "accuracy_generate")
SCORER_TITLES = {"argmax": "argmax at the last prompt position (the answer's first token)",
                 "generate": "greedy generation, scored as upstream (the target alone in the first sentence)"}
_ACCURACY_SCALE = "Viridis"
_RATIO_SCALE = "RdBu"  # red < 1 < blue
_RATIO_SPAN = 2.0  # log2 ratio at the ends of the colour scale: 1/4 .. 4
_UNDEFINED_COLOUR = "#d0d0d0"  # behind the ratio heat-map: the cells where the ratio is undefined (0 / 0, x / 0)


def length_label(length) -> str:
    """Tokens as the column label: 4096 -> "4k", 300 -> "300", missing -> "n/a"."""
    from ..data.babilong import format_length

    if length is None or length is pd.NA or (isinstance(length, float) and np.isnan(length)):
        return "n/a"
    return format_length(int(length))


def _is_missing(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and np.isnan(x))


def _axes(table: pd.DataFrame) -> tuple[list, list]:
    """Tasks in order of appearance, length labels ascending (missing last)."""
    lengths = sorted(_unique(table["length"]), key=lambda x: np.inf if _is_missing(x) else int(x))
    return _unique(table["task"]), list(dict.fromkeys(length_label(x) for x in lengths))


def _grid(rows: pd.DataFrame, column: str, tasks: list, lengths: list) -> np.ndarray:
    """`column` of `rows` (one per task × length) as [tasks, lengths]; NaN where absent."""
    out = np.full((len(tasks), len(lengths)), np.nan)
    for task, length, v in zip(rows["task"], rows["length"], rows[column]):
        out[tasks.index(task), lengths.index(length_label(length))] = np.nan if _is_missing(v) else float(v)
    return out


def _check(table: pd.DataFrame, scorer: str) -> str:
    check_columns(table, TABLE_REQUIRED, "accuracy table")
    if table.empty:
        raise DiffMambaError("the accuracy table has no rows")
    if scorer not in SCORER_TITLES:
        raise DiffMambaError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORER_TITLES)}")
    return f"accuracy_{scorer}"


def _cells(values: np.ndarray, fmt: str) -> list[list[str]]:
    """Cell texts: the value formatted, "–" where it is NaN."""
    return [[("–" if not np.isfinite(v) else fmt.format(v)) for v in row] for row in values]


def accuracy_heatmap_figure(table: pd.DataFrame, scorer: str = "generate") -> go.Figure:
    """Accuracy by task × context length, one heat-map panel per model on one 0–1 colour scale."""
    column = _check(table, scorer)
    models = _unique(table["model"])
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=[_text(m) for m in models], horizontal_spacing=0.06)
    tasks, lengths = _axes(table)
    for k, m in enumerate(models):
        d = table[table["model"] == m]
        values, n = _grid(d, column, tasks, lengths), _grid(d, "n", tasks, lengths)
        fig.add_trace(go.Heatmap(
            z=values, x=lengths, y=tasks, zmin=0.0, zmax=1.0, coloraxis="coloraxis", name=_text(m),
            text=_cells(values, "{:.2f}"), texttemplate="%{text}", customdata=n.astype(int) if np.isfinite(n).all() else n,
            hovertemplate=(f"<b>{_text(m)}</b><br>%{{y}} at %{{x}}: %{{z:.1%}} of %{{customdata}}<extra></extra>")),
            row=1, col=k + 1)
        fig.update_xaxes(type="category", title_text="context length (tokens)", showgrid=False, row=1, col=k + 1)
        fig.update_yaxes(type="category", autorange="reversed", showgrid=False, row=1, col=k + 1)
    fig.update_layout(coloraxis=dict(colorscale=_ACCURACY_SCALE, cmin=0.0, cmax=1.0,
                                     colorbar=dict(title="accuracy", tickformat=".0%")))
    how = (f"Each cell is the share of questions answered correctly, scored by {SCORER_TITLES[scorer]}, for one "
           "task (row) at one context length (column, in tokens of filler and story); the number in the cell is "
           "the accuracy (0–1). The paper's retrieval result is how fast each model's row fades to the right.")
    _finish(fig, title=f"Accuracy by context length ({scorer})", how=how, xlabel=None, ylabel=None,
            height=max(300, 110 + 45 * table["task"].nunique()))
    fig.update_yaxes(title_text="task", row=1, col=1)
    return fig


def accuracy_ratio_figure(table: pd.DataFrame, model_a: str, model_b: str, scorer: str = "generate") -> go.Figure:
    """Accuracy of `model_b` / accuracy of `model_a` per task × length (`analysis.accuracy.accuracy_ratio`),
    the colour on log2 of the ratio (clipped at ¼ and 4), the ratio in the cells and in customdata[0]."""
    from ..analysis.accuracy import accuracy_ratio

    _check(table, scorer)
    ratio = accuracy_ratio(table, model_a, model_b, scorer)
    tasks, lengths = _axes(ratio)
    values, acc_a, acc_b = (_grid(ratio, c, tasks, lengths) for c in ("ratio", "accuracy_a", "accuracy_b"))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.clip(np.log2(values), -_RATIO_SPAN, _RATIO_SPAN)
    z[~np.isfinite(values)] = np.nan
    customdata = np.stack([values, acc_a, acc_b], axis=-1)
    ticks = [0.25, 0.5, 1.0, 2.0, 4.0]
    fig = go.Figure(go.Heatmap(
        z=z, x=lengths, y=tasks, zmin=-_RATIO_SPAN, zmax=_RATIO_SPAN, zmid=0.0, colorscale=_RATIO_SCALE,
        name=f"{_text(model_b)} / {_text(model_a)}", text=_cells(values, "{:.2f}"), texttemplate="%{text}",
        customdata=customdata,
        colorbar=dict(title="ratio", tickvals=np.log2(ticks).tolist(), ticktext=[f"{t:g}" for t in ticks]),
        hovertemplate=(f"%{{y}} at %{{x}}: {_text(model_b)} / {_text(model_a)} = %{{customdata[0]:.3f}}"
                       f"<br>{_text(model_a)} %{{customdata[1]:.1%}}, {_text(model_b)} %{{customdata[2]:.1%}}"
                       "<extra></extra>")))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    how = (f"Each cell is the accuracy of {model_b} divided by that of {model_a} ({scorer} scoring) for one task "
           f"and context length: above 1 (blue) {model_b} does better, below 1 (red) {model_a} does, 1 (white) "
           f"they tie; grey, marked –, where {model_a} gets none right (the ratio is undefined). The paper's "
           "comparison figure shows max/min coloured by which is larger; this is the same comparison as one "
           "signed ratio.")
    _finish(fig, title=f"Accuracy ratio {model_b} / {model_a} ({scorer})", how=how,
            xlabel="context length (tokens)", ylabel="task", height=max(300, 110 + 45 * len(tasks)))
    fig.update_layout(plot_bgcolor=_UNDEFINED_COLOUR)  # an undefined ratio (NaN, drawn as no cell) is grey, not white
    fig.update_xaxes(showgrid=False)
    fig.update_yaxes(showgrid=False)
    return fig


def _scorers(table: pd.DataFrame) -> list[str]:
    """The scorers that were run (accuracy not all NaN), generation first."""
    return [s for s in ("generate", "argmax") if pd.to_numeric(table[f"accuracy_{s}"], errors="coerce").notna().any()]


def _models_and_baseline(table: pd.DataFrame, baseline: str | None) -> tuple[list, str]:
    check_columns(table, TABLE_REQUIRED, "accuracy table")
    if table.empty:
        raise DiffMambaError("the accuracy table has no rows")
    models = _unique(table["model"])
    baseline = models[0] if baseline is None else baseline
    if baseline not in models:
        raise DiffMambaError(f"baseline {baseline!r} is not among the models ({', '.join(map(str, models))})")
    return models, baseline


def accuracy_figures(table: pd.DataFrame, baseline: str | None = None) -> dict[str, list[tuple[str, go.Figure]]]:
    """Every figure of an accuracy table, in page order, under its heading -> {heading: [(name, figure)]}:
    per scorer that was run (generation first) the heat-maps of every model ("Accuracy by task and
    context length: <scorer>"), then for each scorer the ratio of every other model over `baseline`
    (default: the first model; "Ratio to <baseline>", absent with one model). ``name`` is the figure's
    id on the page (``accuracy-<scorer>``, ``ratio-<scorer>-<model>``)."""
    models, baseline = _models_and_baseline(table, baseline)
    scorers = _scorers(table)
    out = {f"Accuracy by task and context length: {s}": [(f"accuracy-{s}", accuracy_heatmap_figure(table, s))]
           for s in scorers}
    others = [m for m in models if m != baseline]
    if others:
        out[f"Ratio to {baseline}"] = [(f"ratio-{s}-{m}", accuracy_ratio_figure(table, baseline, m, s))
                                       for s in scorers for m in others]
    return out


def accuracy_wide_table(table: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """The figures' numbers as one row per task × length, columns in two levels: ("", "task"), ("",
    "length": its label, "4k"), ("", "n": questions per model and cell), then per scorer that was run
    (generation first) each model's accuracy (scorer, model) and each other model's ratio to `baseline`
    (scorer, "<model> / <baseline>", or "ratio" when there are two models; NaN where the baseline gets
    none right)."""
    from ..analysis.accuracy import accuracy_ratio

    models, baseline = _models_and_baseline(table, baseline)
    keys = table[["task", "length"]].drop_duplicates().reset_index(drop=True)

    def column(frame: pd.DataFrame, name: str) -> np.ndarray:
        return keys.merge(frame[["task", "length", name]], on=["task", "length"], how="left")[name].to_numpy()

    cols = {("", "task"): keys["task"].to_numpy(), ("", "length"): [length_label(x) for x in keys["length"]],
            ("", "n"): column(table.groupby(["task", "length"], as_index=False, dropna=False)["n"].max(), "n")}
    for s in _scorers(table):
        for m in models:
            cols[(s, str(m))] = column(table[table["model"] == m], f"accuracy_{s}").astype(float)
        others = [m for m in models if m != baseline]
        for m in others:
            name = "ratio" if len(others) == 1 else f"{m} / {baseline}"
            cols[(s, name)] = column(accuracy_ratio(table, baseline, m, s), "ratio").astype(float)
    return pd.DataFrame(cols, columns=pd.MultiIndex.from_tuples(list(cols)))


def write_accuracy_report(path, table: pd.DataFrame, *, title: str = "Accuracy by context length",
                          baseline: str | None = None, meta: Mapping | None = None,
                          tables: Mapping[str, pd.DataFrame] | None = None) -> Path:
    """One self-contained HTML page: the sections of `accuracy_figures` (per scorer that was run, the
    accuracy heat-maps of every model; the ratio of every other model over `baseline`, default the
    first model), then the table (and `tables`). plotly.js is embedded once; written atomically."""
    figures = accuracy_figures(table, baseline)
    page = _Page()
    for heading, figs in figures.items():
        page.section(heading)
        for name, fig in figs:
            page.figure(fig, name)
    page.section("Tables")
    page.table("accuracy by model, task and length (95% Wilson intervals, story-clustered)", table.round(4))
    for name, df in (tables or {}).items():
        page.table(str(name), df)
    doc = page.document(title, _meta_block(meta, table), contents=True)
    return write_atomic(path, doc)


def length_accuracy_section(page, table: pd.DataFrame, *, baseline: str | None = None) -> None:
    """The full report's "Accuracy by context length" section on `page` (a `page._Page`): a note, the
    figures of `accuracy_figures` (the heat-maps per scorer, then the ratio of every other model to
    `baseline`, default the first model; no sub-headings: each figure's title says what it shows) and
    `accuracy_wide_table`."""
    models, baseline = _models_and_baseline(table, baseline)
    figures = accuracy_figures(table, baseline)
    wide = accuracy_wide_table(table, baseline)
    tasks, lengths = _axes(table)
    n = sorted({int(x) for x in pd.to_numeric(table["n"], errors="coerce").dropna()})
    n_text = str(n[0]) if len(n) == 1 else f"{n[0]}–{n[-1]}"
    page.section("Accuracy by context length")
    scored = {"generate": "by greedy generation as upstream (the target alone in the first generated sentence)",
              "argmax": "by the argmax at the last prompt position (the answer's first token)"}
    page.note(f"Accuracy of {', '.join(map(str, models))} per task ({', '.join(map(str, tasks))}) and context length "
              f"({', '.join(lengths)} tokens), {n_text} questions per task and length, scored "
              + " and ".join(scored[s] for s in _scorers(table))
              + (f"; then each model's accuracy divided by {baseline}'s, the paper's comparison." if len(models) > 1
                 else "."))
    for figs in figures.values():  # each figure's title names its scorer (and the models of a ratio)
        for name, fig in figs:
            page.figure(fig, name)
    others = [m for m in models if m != baseline]
    ratio = (f", and the ratio {others[0]} / {baseline}" if len(others) == 1 else
             f", and the ratio of each model to {baseline}" if others else "")
    page.table(f"accuracy by task and context length{ratio}", wide)
