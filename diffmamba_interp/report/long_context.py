"""Implicit attention pages that stay readable and small at any length: an attention report with a
hard cap on its size (the `attention` command). The figures (answer rows, full maps on one shared
colour scale) are `report.attention`'s, as in the full report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import DiffMambaError
from ..files import write_atomic
from .attention import HOVER_TOKENS, _short, answer_row_figure, attention_figures  # noqa: F401 (re-exported)
from .html import _meta_block, _Page

__all__ = ["MAX_HTML_BYTES", "answer_row_figure", "attention_figures", "write_attention_report"]

MAX_HTML_BYTES = 10 * 1024 * 1024  # one attention page at most (plotly.js itself is ~4.8 MB of it)
_PLOTLYJS_BYTES = 4_900_000


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
            tok = 2 * sum(len(str(t)) + 10 for t in e["tokens"])  # the x and y categories
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
    for k, fig in enumerate(attention_figures(entries)):
        page.figure(fig, f"attention-{k}")
    data = page.document(title, _meta_block(meta, None), contents=False).encode("utf-8")
    if len(data) > max_bytes:
        raise _too_big(len(data), max_bytes, "")
    return write_atomic(path, data)  # temp file + rename: never a half-written report
