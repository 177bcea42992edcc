"""One self-contained, offline HTML report: plotly.js embedded once, no network references."""

from __future__ import annotations

import datetime as _dt
import html as _html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

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
    how_to_read,
    measure_curves_figure,
    needle_prob_figure,
    paired_figure,
)
from .attention import attention_figures
from .model_figures import accuracy_figure, lambda_figure
from .needle import needle_section
from .seeds import seed_sections

__all__ = ["write_report", "FIGURE_DIV_CLASS"]

#: class on the wrapper <div> of every figure in the report (one per figure).
FIGURE_DIV_CLASS = "dm-figure"

_MEASURE_ORDER = ("prob", "snr_db", "distractor_log_ratio", "distractor_ratio", "logprob", "rank")
_PLOTLY_CONFIG = {"responsive": True, "displaylogo": False,
                  "toImageButtonOptions": {"format": "png", "scale": 2}}

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 1rem 1.5rem 3rem; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
nav ul { margin: .2rem 0; padding-left: 1.2rem; }
.dm-meta { border-collapse: collapse; font-size: .9rem; margin-bottom: 1rem; }
.dm-meta th { text-align: left; padding: .15rem 1rem .15rem 0; color: #555; font-weight: 600;
              vertical-align: top; }
.dm-meta td { padding: .15rem 0; }
.dm-figure { margin: .5rem 0 .3rem; }
p.how { margin: 0 0 1.4rem; font-size: .92rem; color: #444; background: #f6f8fa;
        border-left: 3px solid #0072B2; padding: .4rem .7rem; }
table.dm-table { border-collapse: collapse; font-size: .85rem; margin: .3rem 0 1.2rem; }
table.dm-table th, table.dm-table td { border: 1px solid #ddd; padding: .2rem .5rem; white-space: nowrap; }
table.dm-table th { background: #f3f3f3; }
table.dm-table td { text-align: right; font-variant-numeric: tabular-nums; }
.dm-scroll { overflow-x: auto; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; }
footer { margin-top: 3rem; color: #777; font-size: .8rem; }
.dm-warning { margin: .6rem 0 1rem; padding: .6rem .9rem; background: #fff4e5; color: #5a3700;
              border: 1px solid #f0b429; border-left: 6px solid #d97706; border-radius: 3px; }
p.dm-note { font-size: .92rem; color: #444; margin: .3rem 0 .8rem; }
"""


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "x"


class _Page:
    """Accumulates sections and figures; embeds plotly.js with the first figure only."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.n_figures = 0
        self._ids: set[str] = set()

    def _unique_id(self, base: str) -> str:
        slug, k = _slug(base), 1
        uid = slug
        while uid in self._ids:
            k += 1
            uid = f"{slug}-{k}"
        self._ids.add(uid)
        return uid

    def section(self, title: str) -> None:
        sid = self._unique_id("sec-" + title)
        self.toc.append((sid, title))
        self.parts.append(f'<h2 id="{sid}">{_html.escape(title)}</h2>')

    def document(self, title: str, meta_html: str, *, contents: bool, note: str = "") -> str:
        """The whole self-contained page: head (charset, viewport, figure count, CSS), the title,
        `meta_html`, a table of contents of the sections (when `contents`), the parts, and a footer
        with the figure count and `note`."""
        toc = "".join(f'<li><a href="#{sid}">{_html.escape(t)}</a></li>' for sid, t in self.toc)
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="diffmamba-figures" content="{self.n_figures}">',
            f"<title>{_html.escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_html.escape(title)}</h1>",
            meta_html,
            f"<nav><b>Contents</b><ul>{toc}</ul></nav>" if contents and toc else "",
            *self.parts,
            f"<footer>{self.n_figures} figure(s). {note}Self-contained page: plotly.js is embedded, "
            "nothing is loaded from the network.</footer>",
            "</body>",
            "</html>",
        ])

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="dm-note">{_html.escape(text)}</p>')

    def heading(self, title: str) -> None:
        self.parts.append(f"<h3>{_html.escape(title)}</h3>")

    def figure(self, fig: go.Figure, name: str) -> None:
        div_id = self._unique_id("fig-" + name)
        body = fig.to_html(
            full_html=False,
            include_plotlyjs=(self.n_figures == 0),  # the bundle itself, inline, exactly once
            include_mathjax=False,
            div_id=div_id,
            config=_PLOTLY_CONFIG,
            default_width="100%",
            default_height=f"{int(fig.layout.height or 450)}px",
            validate=True,
        )
        self.n_figures += 1
        self.parts.append(f'<div class="{FIGURE_DIV_CLASS}" data-figure="{div_id}">{body}</div>')
        note = how_to_read(fig)
        if note:
            self.parts.append(f'<p class="how"><b>How to read this:</b> {_html.escape(note)}</p>')

    def table(self, name: str, df: pd.DataFrame) -> None:
        if not isinstance(df, pd.DataFrame):
            raise DiffMambaError(f"table {name!r} must be a pandas DataFrame, "
                                 f"got {type(df).__name__}")
        keep_index = not (isinstance(df.index, pd.RangeIndex) and df.index.name is None)
        body = df.to_html(classes="dm-table", border=0, index=keep_index, escape=True,
                          na_rep="–", float_format=_fmt_float)
        self.parts.append(f'<h3 id="{self._unique_id("tab-" + name)}">{_html.escape(name)}</h3>'
                          f'<div class="dm-scroll">{body}</div>')


def _fmt_float(x: float) -> str:
    return f"{x:.4g}"


def _meta_value(v) -> str:
    if isinstance(v, Mapping):
        return "; ".join(f"{_html.escape(str(k))}: {_meta_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple, set)):
        return ", ".join(_meta_value(x) for x in v)
    if isinstance(v, float):
        return _html.escape(f"{v:.6g}")
    return _html.escape(str(v))


def _meta_block(meta: Mapping | None, summary: pd.DataFrame) -> str:
    from .. import __version__

    info: dict = {}
    if summary is not None:
        info["models"] = list(dict.fromkeys(map(str, summary["model"])))
    info.update(dict(meta or {}))
    info.setdefault("version", f"diffmamba-interp {__version__}")
    info.setdefault("date", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    rows = "".join(f"<tr><th>{_html.escape(str(k).replace('_', ' '))}</th>"
                   f"<td>{_meta_value(v)}</td></tr>" for k, v in info.items())
    return f'<table class="dm-meta" id="meta">{rows}</table>'


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


def _check_inputs(summary, paired, branch, accuracy, lambdas, tables) -> None:
    if summary is not None:
        check_columns(summary, REPORT_SUMMARY_COLUMNS, "summary")
        if summary.empty:
            raise DiffMambaError("summary has no rows")
    for frame, columns, name in ((paired, REPORT_PAIRED_COLUMNS, "paired"), (branch, BRANCH_COLUMNS, "branch"),
                                 (accuracy, ACCURACY_COLUMNS, "accuracy"), (lambdas, LAMBDA_COLUMNS, "lambdas")):
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
                 meta: Mapping | None = None, warnings: Sequence[str] = (), unit: str = "stories") -> Path:
    """Write one self-contained HTML report to ``path`` and return it as a Path.

    Sections: meta block and warning boxes (``warnings``, and one when the summary's ``n_clusters`` —
    ``unit``, stories by default — fall below `schemas.MIN_CLUSTERS`), task accuracy (``accuracy``),
    needle probability (linear bars and log-axis points, if ``summary`` has "prob" rows), every other
    summary measure as curves with CI bands (the log distractor ratio in place of the raw one when both
    are there), paired differences (one figure per measure in ``paired``, same rule), the seed-level
    sections (``seeds``, an `analysis.seeds.SeedCompareResult`: per-seed curves with each architecture's
    seed-level mean and interval, and the difference across seeds; `report.seeds`), λ per differential
    block (``lambdas``), branch decomposition, one attention figure per entry (full maps on one shared
    colour scale, or answer rows), the needle share of each block's answer row (``needle``, a
    `NeedleAttention.summary`; `report.needle`), one heat-map per ``patching`` result
    (`analysis.patching.PatchingResult`, titled by its ``.model`` if set), and the ``tables``. Optional inputs that are None or empty are
    omitted. plotly.js is embedded inline once (with the first figure); nothing is fetched from the
    network. Missing required columns raise DiffMambaError naming them; parent directories of ``path``
    are created.
    """
    _check_inputs(summary, paired, branch, accuracy, lambdas, tables)
    entries = _attention_entries(attention)

    # Build every figure before writing anything, so bad input leaves no half-written file.
    page = _Page()
    if _given(accuracy):
        page.section("Task accuracy")
        page.figure(accuracy_figure(accuracy), "accuracy")
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
                             "lambdas, needle, seeds or tables")
    boxes = _warning_boxes(_sample_warnings(summary, paired, warnings, unit))
    doc = page.document(title, _meta_block(meta, summary) + boxes, contents=True,
                        note="Layer 0 = embeddings, layer k = residual stream after block k = the paper's layer k − 1. ")
    return write_atomic(path, doc)  # temp file + rename: never a half-written report
