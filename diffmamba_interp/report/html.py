"""One self-contained, offline HTML report: plotly.js embedded once, no network references."""

from __future__ import annotations

import html as _html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DiffMambaError
from ..files import write_atomic
from ..schemas import (ACCURACY_COLUMNS, LAMBDA_COLUMNS, REPORT_PAIRED_COLUMNS, REPORT_SUMMARY_COLUMNS,
                       few_clusters_warning)
from .figures import (
    BRANCH_COLUMNS,
    patching_effects,
    patching_figure,
    branch_figure,
    check_columns,
    measure_curves_figure,
    needle_prob_figure,
    paired_figure,
)
from .accuracy import TABLE_REQUIRED as LENGTH_ACCURACY_COLUMNS, length_accuracy_section
from .attention import attention_figures
from .model_figures import accuracy_figure, lambda_figure
from .needle import needle_section
from .page import FIGURE_DIV_CLASS, _meta_block, _Page  # noqa: F401  (long_context imports both from here)
from .seeds import seed_sections

__all__ = ["write_report", "FIGURE_DIV_CLASS"]

_MEASURE_ORDER = ("prob", "snr_db", "distractor_log_ratio", "distractor_ratio", "logprob", "rank")


def _ordered_measures(measures) -> list[str]:
    present = list(dict.fromkeys(map(str, measures)))
    return [m for m in _MEASURE_ORDER if m in present] + sorted(
        m for m in present if m not in _MEASURE_ORDER)


def _plotted_measures(measures) -> list[str]:
    """The measures to draw, in order; the raw distractor ratio gives way to its log when both are there
    (a few huge ratios dominate its mean and its differences; the tables keep it)."""
    ordered = _ordered_measures(measures)
    if "distractor_log_ratio" in ordered:
        ordered = [m for m in ordered if m != "distractor_ratio"]
    return ordered


def _attention_entries(attention) -> list:
    if attention is None:
        return []
    if isinstance(attention, Mapping):
        return [attention]
    if isinstance(attention, Sequence) and not isinstance(attention, (str, bytes)):
        return list(attention)
    raise DiffMambaError(f"attention must be a list of dicts, got {type(attention).__name__}")


def _warning_boxes(warnings: Sequence[str]) -> str:
    """One visible box per warning (before the contents), or nothing."""
    return "".join(f'<div class="dm-warning" role="alert"><b>Warning:</b> {_html.escape(w)}</div>'
                   for w in dict.fromkeys(warnings))


def _sample_warnings(summary, paired, extra: Sequence[str], unit: str) -> list[str]:
    """The caller's warnings, then the too-few-stories warning of the summary (or the paired frame)."""
    found = [w for w in (few_clusters_warning(summary, unit), few_clusters_warning(paired, unit)) if w]
    return [str(w) for w in extra] + found[:1]


def _summary_sections(page: _Page, summary: pd.DataFrame) -> None:
    measures = _plotted_measures(summary["measure"])
    if "prob" in measures:
        page.section("Needle probability per layer")
        page.figure(needle_prob_figure(summary, log_scale=False), "needle-prob-linear")
        page.figure(needle_prob_figure(summary, log_scale=True), "needle-prob-log")
    others = [m for m in measures if m != "prob"]
    if others:
        page.section("Signal-to-noise and other lens measures")
        for m in others:
            page.figure(measure_curves_figure(summary, m), f"curves-{m}")


def _paired_section(page: _Page, paired: pd.DataFrame) -> None:
    page.section("Paired differences between models")
    measures = _plotted_measures(paired["measure"])
    if "distractor_log_ratio" in measures and "distractor_ratio" in set(paired["measure"]):
        page.note("The distractor ratio is compared on its log (distractor_log_ratio): differences of raw ratios "
                  "are dominated by a few huge values (--json and --per-example keep the raw ratio).")
    for m in measures:
        page.figure(paired_figure(paired, m), f"paired-{m}")


def _attention_section(page: _Page, entries: list) -> None:
    """Full maps on one colour scale shared by every figure of the section; answer rows as line panels."""
    page.section("Implicit attention maps")
    figures = attention_figures(entries)
    if sum(f.data[0].type == "heatmap" for f in figures) > 1:
        page.note("Every attention map below shares one colour scale, so models and branches can be compared by eye.")
    for k, fig in enumerate(figures):
        page.figure(fig, f"attention-{k}")


def _patching_section(page: _Page, patching) -> None:
    page.section("Patching")
    effects = [np.abs(e[np.isfinite(e)]) for e in map(patching_effects, patching)]
    zmax = max((float(e.max()) for e in effects if e.size), default=1.0)  # one colour scale for every model
    for k, result in enumerate(patching):
        label = getattr(result, "model", None)
        if label:
            page.heading(str(label))
        page.figure(patching_figure(result, zmax=zmax), f"patching-{k}")


def _check_inputs(summary, paired, branch, accuracy, lambdas, tables, length_accuracy=None) -> None:
    if summary is not None:
        check_columns(summary, REPORT_SUMMARY_COLUMNS, "summary")
        if summary.empty:
            raise DiffMambaError("summary has no rows")
    for frame, columns, name in ((paired, REPORT_PAIRED_COLUMNS, "paired"), (branch, BRANCH_COLUMNS, "branch"),
                                 (accuracy, ACCURACY_COLUMNS, "accuracy"), (lambdas, LAMBDA_COLUMNS, "lambdas"),
                                 (length_accuracy, LENGTH_ACCURACY_COLUMNS, "length_accuracy")):
        if frame is not None:
            check_columns(frame, columns, name)
    if tables is not None and not isinstance(tables, Mapping):
        raise DiffMambaError(f"tables must be a dict name -> DataFrame, got {type(tables).__name__}")


def _given(frame) -> bool:
    return frame is not None and not frame.empty


def write_report(path, *, title: str, summary: pd.DataFrame | None = None, paired: pd.DataFrame | None = None,
                 branch: pd.DataFrame | None = None, attention=None, patching=None,
                 accuracy: pd.DataFrame | None = None, lambdas: pd.DataFrame | None = None,
                 tables: Mapping[str, pd.DataFrame] | None = None, needle: pd.DataFrame | None = None, seeds=None,
                 length_accuracy: pd.DataFrame | None = None,
                 meta: Mapping | None = None, warnings: Sequence[str] = (), unit: str = "stories") -> Path:
    """Write one self-contained HTML report to ``path`` and return it as a Path.

    Sections: meta block and warning boxes (``warnings``, and one when the summary's ``n_clusters`` —
    ``unit``, stories by default — fall below `schemas.MIN_CLUSTERS`), task accuracy (``accuracy``),
    accuracy by context length (``length_accuracy``, an `analysis.accuracy.accuracy_by_length` table:
    heat-maps per scorer and model, the ratio of every other model to the first, and a table;
    `report.accuracy.length_accuracy_section`), needle probability (linear bars and log-axis points, if
    ``summary`` has "prob" rows), every other summary measure as curves with CI bands (the log distractor
    ratio in place of the raw one when both are there), paired differences (one figure per measure in
    ``paired``, same rule), the seed-level sections (``seeds``, an `analysis.seeds.SeedCompareResult`:
    per-seed curves with each architecture's seed-level mean and interval, and the difference across seeds;
    `report.seeds`), λ per differential block (``lambdas``), branch decomposition, one attention figure per
    entry (full maps on one shared colour scale, or answer rows), the needle share of each block's answer
    row (``needle``, a `NeedleAttention.summary`; `report.needle`), one heat-map per ``patching`` result
    (`analysis.patching.PatchingResult`, titled by its ``.model`` if set), and the ``tables``. Optional
    inputs that are None or empty are omitted. plotly.js is embedded inline once (with the first figure);
    nothing is fetched from the network. Missing required columns raise DiffMambaError naming them; parent
    directories of ``path`` are created.
    """
    _check_inputs(summary, paired, branch, accuracy, lambdas, tables, length_accuracy)
    entries = _attention_entries(attention)

    # Build every figure before writing anything, so bad input leaves no half-written file.
    page = _Page()
    if _given(accuracy):
        page.section("Task accuracy")
        page.figure(accuracy_figure(accuracy), "accuracy")
    if _given(length_accuracy):
        length_accuracy_section(page, length_accuracy)
    if summary is not None:
        _summary_sections(page, summary)
    if _given(paired):
        _paired_section(page, paired)
    if seeds is not None:
        seed_sections(page, seeds)
    if _given(lambdas):
        page.section("λ per differential block")
        page.figure(lambda_figure(lambdas), "lambda")
    if _given(branch):
        page.section("Branch decomposition of differential blocks")
        page.figure(branch_figure(branch), "branch")
    if entries:
        _attention_section(page, entries)
    if _given(needle):
        needle_section(page, needle)
    if patching:
        _patching_section(page, patching)
    if tables:
        page.section("Tables")
        for name, df in tables.items():
            page.table(str(name), df)

    if page.n_figures == 0 and not tables:
        raise DiffMambaError("nothing to report: give a summary, paired, branch, attention, patching, accuracy, "
                             "length_accuracy, lambdas, needle, seeds or tables")
    boxes = _warning_boxes(_sample_warnings(summary, paired, warnings, unit))
    doc = page.document(title, _meta_block(meta, summary) + boxes, contents=True,
                        note="Layer 0 = embeddings, layer k = residual stream after block k = the paper's layer k − 1. ")
    return write_atomic(path, doc)  # temp file + rename: never a half-written report
