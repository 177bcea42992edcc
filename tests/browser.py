"""Open an HTML page in headless Chromium and report what happened (test helper, no extra deps).

How it works: a small probe <script> is injected at the top of <head> of a temporary copy of the
page, so it runs before anything else. It records ``error`` events (script errors and failed
resource loads), unhandled promise rejections and ``console.error`` calls; after the window
``load`` event it polls until every plotly graph div has drawn an ``svg.main-svg`` (or a time
limit passes), lists any resource the page fetched that is not file:/data:/blob:, and writes the
result as JSON into ``<pre id="dm-probe-result">``. Chromium runs with ``--dump-dom`` and a
virtual time budget, so timers run to completion and the final DOM (with the JSON) is printed to
stdout, where we parse it.

Also, without a browser: `figures_of` (every figure's data and layout, read from the page's
``Plotly.newPlot`` calls) and `legend_problems` (a legend entry without a name, or a legend group with
no entry).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "check_page_in_chromium", "screenshot_page", "figures_of", "legend_problems",
           "CHROMIUM_FLAGS"]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)

_RESULT_ID = "dm-probe-result"

_PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    if (e && e.target && e.target !== window && (e.target.src || e.target.href)) {
      errors.push("resource failed: " + (e.target.src || e.target.href));
    } else {
      errors.push("error: " + (e && e.message) + " at " + (e && e.filename) + ":" + (e && e.lineno));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    errors.push("unhandledrejection: " + String(e && e.reason));
  });
  var origError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.map.call(arguments, String).join(" "));
    return origError.apply(console, arguments);
  };
  function report(waited) {
    var divs = document.querySelectorAll(".plotly-graph-div");
    var plots = document.querySelectorAll(".js-plotly-plot");
    var drawn = 0;
    plots.forEach(function (p) { if (p.querySelector("svg.main-svg")) { drawn += 1; } });
    var external = [];
    (performance.getEntriesByType("resource") || []).forEach(function (r) {
      if (!/^(file|data|blob|about):/.test(r.name)) { external.push(r.name); }
    });
    var out = document.createElement("pre");
    out.id = "%(rid)s";
    out.textContent = JSON.stringify({
      errors: errors, graph_divs: divs.length, plots: plots.length, drawn: drawn,
      external_requests: external, waited_ms: waited,
      plotly_version: (window.Plotly && window.Plotly.version) || null
    });
    document.body.appendChild(out);
  }
  window.addEventListener("load", function () {
    var waited = 0;
    (function poll() {
      var divs = document.querySelectorAll(".plotly-graph-div").length;
      var drawn = document.querySelectorAll(".js-plotly-plot svg.main-svg").length;
      var plots = document.querySelectorAll(".js-plotly-plot").length;
      if ((plots >= divs && drawn >= plots) || waited >= %(max_wait)d) { report(waited); return; }
      waited += 100;
      setTimeout(poll, 100);
    })();
  });
})();
</script>"""


def find_chromium() -> str | None:
    """Path of a Chromium binary ($CHROMIUM, /usr/bin/chromium, or one on PATH), else None."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium"]
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _inject(page: str, script: str) -> str:
    m = re.search(r"<head[^>]*>", page, flags=re.IGNORECASE)
    if m:
        return page[: m.end()] + script + page[m.end():]
    return script + page


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run chromium in its own process group and kill that whole group on timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"chromium timed out after {timeout:.0f}s; stderr tail: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_page_in_chromium(html_path, *, chromium: str | None = None,
                           virtual_time_budget_ms: int = 10000, timeout: float = 90.0) -> dict:
    """Load ``html_path`` from file:// in headless Chromium; return what the probe saw.

    Returned dict: ``errors`` (list of JS errors / console.error messages / failed resources),
    ``graph_divs`` (plotly graph divs in the page), ``plots`` (divs plotly initialised),
    ``drawn`` (plots that rendered an svg.main-svg), ``external_requests`` (non-file URLs the page
    fetched), ``plotly_version``, ``waited_ms``, plus ``returncode`` and ``stderr_tail`` of the
    chromium process. Raises FileNotFoundError when no chromium exists and RuntimeError when the
    probe result is missing from the dumped DOM.
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary found")
    src = Path(html_path)
    page = src.read_text(encoding="utf-8")
    max_wait = max(1000, virtual_time_budget_ms - 1000)
    probe = _PROBE % {"rid": _RESULT_ID, "max_wait": max_wait}
    with tempfile.TemporaryDirectory(prefix="dm-chromium-") as tmp:
        probed = Path(tmp) / ("probed-" + src.name)
        probed.write_text(_inject(page, probe), encoding="utf-8")
        profile = Path(tmp) / "profile"
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--virtual-time-budget={virtual_time_budget_ms}", "--dump-dom",
               probed.resolve().as_uri()]
        proc = _run(cmd, timeout)
    m = re.search(rf'<pre id="{_RESULT_ID}">(.*?)</pre>', proc.stdout, flags=re.DOTALL)
    if not m:
        raise RuntimeError(
            f"probe result not found in chromium's DOM dump (rc={proc.returncode}, "
            f"{len(proc.stdout)} chars of stdout); stderr tail: {proc.stderr[-2000:]}")
    result = json.loads(html.unescape(m.group(1)))
    result["returncode"] = proc.returncode
    result["stderr_tail"] = proc.stderr[-2000:]
    return result


def screenshot_page(html_path, png_path, *, window_size=(1200, 2000), chromium: str | None = None,
                    virtual_time_budget_ms: int = 10000, timeout: float = 90.0) -> Path:
    """Save a PNG screenshot of ``html_path`` (for manual checks; not used by the tests)."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary found")
    png = Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="dm-chromium-") as tmp:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}",
               f"--virtual-time-budget={virtual_time_budget_ms}",
               f"--window-size={window_size[0]},{window_size[1]}", f"--screenshot={png}",
               Path(html_path).resolve().as_uri()]
        proc = _run(cmd, timeout)
    if not png.exists():
        raise RuntimeError(f"no screenshot written (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return png


def figures_of(page: str) -> dict[str, tuple[list, dict]]:
    """Every `Plotly.newPlot(id, data, layout, config)` of the page -> {id: (data, layout)}."""
    decoder = json.JSONDecoder()
    out = {}
    for m in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', page):
        data, end = decoder.raw_decode(page, m.end())
        rest = re.match(r"\s*,\s*", page[end:])
        layout, _ = decoder.raw_decode(page, end + rest.end())
        out[m.group(1)] = (data, layout)
    return out


def legend_problems(data: list, layout: dict) -> list[str]:
    """What is wrong with a figure's legend: a trace shown in it without a name, or a legend group (or
    name) of line / bar traces none of whose traces is shown with its data."""
    problems, shown = [], {}
    if layout.get("showlegend") is False:
        return problems
    for t in data:
        if t.get("type", "scatter") not in ("scatter", "bar"):
            continue
        group = t.get("legendgroup") or t.get("name") or ""
        visible = t.get("showlegend", True) is not False and len(t.get("x") or t.get("y") or []) > 0
        if visible and not str(t.get("name") or "").strip():
            problems.append(f"a trace in the legend has no name: {t.get('type')}")
        shown[group] = shown.get(group, False) or visible
    problems += [f"legend group {g!r} has no entry" for g, ok in shown.items() if not ok]
    return problems
