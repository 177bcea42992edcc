"""The page every HTML report is written on: one self-contained, offline document with plotly.js
embedded once (with the first figure), a meta block, a table of contents, sections, figures with
their reading guides, notes and tables. `html.write_report` (the analysis report), `accuracy`
(the `eval` page and the report's accuracy-by-length section) and `long_context` build on it.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import re
from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go

from ..errors import DiffMambaError
from .figures import how_to_read

__all__ = ["FIGURE_DIV_CLASS"]

#: class on the wrapper <div> of every figure in the report (one per figure).
FIGURE_DIV_CLASS = "dm-figure"

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
