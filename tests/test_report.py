"""Report layer: figure builders, the offline HTML page, and a real headless-Chromium check.

All inputs are synthetic DataFrames built here (2 models, 5 layers, made-up values, 6x6 maps).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.colors
import pytest
from plotly.offline import get_plotlyjs

from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.report import (
    attention_figure,
    branch_figure,
    how_to_read,
    measure_curves_figure,
    needle_prob_figure,
    paired_figure,
    write_report,
)

# tests/browser.py, loaded by path so it works whether or not tests/ is a package
_spec = importlib.util.spec_from_file_location("dm_test_browser", Path(__file__).with_name("browser.py"))
browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(browser)

MODELS = ("mamba2-370M", "diffmamba2-370M")
LAYERS = range(5)
MEASURES = ("prob", "snr_db", "distractor_ratio")
TOKENS = ["<context>", "\n", " Mary", " went", " the", " the"]


# ------------------------------------------------------------------------------------- fixtures


def make_summary() -> pd.DataFrame:
    rows = []
    for mi, model in enumerate(MODELS):
        for layer in LAYERS:
            for measure in MEASURES:
                mean = {"prob": 0.02 + 0.08 * layer + 0.03 * mi,
                        "snr_db": -10.0 + 4 * layer + 2 * mi,
                        "distractor_ratio": 0.5 + 0.4 * layer + 0.2 * mi}[measure]
                w = 0.2 * abs(mean) + 0.01
                rows.append(dict(model=model, layer=layer, measure=measure, mean=mean,
                                 median=0.9 * mean, ci_low=mean - w, ci_high=mean + 1.5 * w))
    return pd.DataFrame(rows)


def make_paired() -> pd.DataFrame:
    rows = []
    for measure in ("prob", "snr_db"):
        for layer in LAYERS:
            d = 0.01 * layer - 0.01
            rows.append(dict(model_a=MODELS[0], model_b=MODELS[1], layer=layer, measure=measure,
                             diff_mean=d, ci_low=d - 0.015, ci_high=d + 0.02))
    return pd.DataFrame(rows)


def make_branch() -> pd.DataFrame:
    rows = []
    for model in ("diffmamba2-370M", "diffmamba2-babi"):
        for layer in range(4):
            for comp, v in (("mixer_1", 1.0 + layer), ("-λ·mixer_2", -0.5 * layer),
                            ("block", 1.0 + 0.5 * layer)):
                rows.append(dict(model=model, layer=layer, component=comp, value=v))
    return pd.DataFrame(rows)


def make_attention() -> dict:
    rng = np.random.default_rng(0)
    a1, a2 = np.tril(rng.random((6, 6))), np.tril(rng.random((6, 6)))
    return {"title": "Example 0: needle 'garden'", "tokens": TOKENS,
            "maps": {"branch 1": a1, "branch 2": a2, "differential": a1 - 0.8 * a2}}


def expected_figure_count(summary, paired, branch, attention) -> int:
    n = 2 if "prob" in set(summary["measure"]) else 0  # linear + log needle bars
    n += len(set(summary["measure"]) - {"prob"})        # one curve figure per other measure
    n += 0 if paired is None else paired["measure"].nunique()
    n += 0 if branch is None else 1
    n += len(attention or [])
    return n


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    summary, paired, branch = make_summary(), make_paired(), make_branch()
    attention = [make_attention()]
    tables = {"headline numbers": pd.DataFrame({"model": ["Mamba", "Diff-Mamba"],
                                                "pile_ppl": [11.212, 11.081]})}
    path = tmp_path_factory.mktemp("report") / "nested" / "dir" / "report.html"
    out = write_report(path, title="Diff-Mamba vs Mamba <synthetic>", summary=summary,
                       paired=paired, branch=branch, attention=attention, tables=tables,
                       meta={"data": "babilong 0k qa1", "lens": "tuned", "n_examples": 200})
    n = expected_figure_count(summary, paired, branch, attention)
    return out, n


def _values(x) -> np.ndarray:
    return np.asarray(x, dtype=float)


# ------------------------------------------------------------------------------ figure builders


@pytest.mark.parametrize("log_scale", [False, True])
def test_needle_prob_bars_grouped_with_ci_whiskers(log_scale):
    summary = make_summary()
    fig = needle_prob_figure(summary, log_scale=log_scale)
    assert [t.type for t in fig.data] == ["bar", "bar"]
    assert [t.name for t in fig.data] == list(MODELS)
    assert fig.layout.barmode == "group"
    assert fig.data[0].marker.color != fig.data[1].marker.color
    for trace, model in zip(fig.data, MODELS):
        ref = summary[(summary.model == model) & (summary.measure == "prob")].sort_values("layer")
        assert list(trace.x) == list(LAYERS)
        np.testing.assert_allclose(_values(trace.y), ref["mean"])
        assert trace.error_y.symmetric is False
        np.testing.assert_allclose(_values(trace.error_y.array), ref["ci_high"] - ref["mean"])
        np.testing.assert_allclose(_values(trace.error_y.arrayminus), ref["mean"] - ref["ci_low"])
    assert (fig.layout.yaxis.type == "log") is log_scale
    assert ("log" in fig.layout.title.text) is log_scale
    assert "layer" in fig.layout.xaxis.title.text
    assert "probability" in fig.layout.yaxis.title.text
    assert "needle" in how_to_read(fig) and "whisker" in how_to_read(fig)


@pytest.mark.parametrize("measure", ["snr_db", "distractor_ratio"])
def test_measure_curves_have_mean_line_and_ci_band(measure):
    summary = make_summary()
    fig = measure_curves_figure(summary, measure)
    assert len(fig.data) == 2 * len(MODELS)  # band + line per model
    for k, model in enumerate(MODELS):
        band, line = fig.data[2 * k], fig.data[2 * k + 1]
        ref = summary[(summary.model == model) & (summary.measure == measure)].sort_values("layer")
        assert band.fill == "toself" and band.showlegend is False
        assert line.name == model and line.legendgroup == band.legendgroup
        np.testing.assert_allclose(_values(line.y), ref["mean"])
        # the band polygon: upper edge left-to-right, then lower edge right-to-left
        np.testing.assert_allclose(_values(band.y),
                                   np.r_[ref["ci_high"].to_numpy(), ref["ci_low"].to_numpy()[::-1]])
        assert list(band.x) == list(LAYERS) + list(LAYERS)[::-1]
    assert fig.layout.title.text and fig.layout.yaxis.title.text and fig.layout.xaxis.title.text
    assert how_to_read(fig)
    if measure == "distractor_ratio":  # a ratio with positive CIs: log axis, reference line at 1
        assert fig.layout.yaxis.type == "log"
        assert any(s.y0 == 1.0 and s.y1 == 1.0 for s in fig.layout.shapes)
    else:
        assert fig.layout.yaxis.type != "log"
        assert "dB" in fig.layout.yaxis.title.text


def test_measure_curves_any_measure_and_missing_measure():
    summary = make_summary()
    ranks = summary[summary.measure == "prob"].assign(measure="rank")
    fig = measure_curves_figure(pd.concat([summary, ranks]), "rank")
    assert len(fig.data) == 4 and "rank" in fig.layout.yaxis.title.text
    with pytest.raises(DiffMambaError, match="measure='logprob'"):
        measure_curves_figure(summary, "logprob")


def test_paired_figure_whiskers_zero_line_and_significance():
    paired = make_paired()
    fig = paired_figure(paired, "prob")
    assert len(fig.data) == 1
    (trace,) = fig.data
    ref = paired[paired.measure == "prob"].sort_values("layer")
    assert trace.name == f"{MODELS[1]} − {MODELS[0]}"
    np.testing.assert_allclose(_values(trace.y), ref["diff_mean"])
    np.testing.assert_allclose(_values(trace.error_y.array), ref["ci_high"] - ref["diff_mean"])
    np.testing.assert_allclose(_values(trace.error_y.arrayminus), ref["diff_mean"] - ref["ci_low"])
    zero = [s for s in fig.layout.shapes if s.y0 == 0 and s.y1 == 0]
    assert len(zero) == 1
    # filled marker exactly where the CI excludes zero (layers 3 and 4 here)
    excludes = ((ref["ci_low"] > 0) | (ref["ci_high"] < 0)).tolist()
    assert excludes == [False, False, False, True, True]
    assert list(trace.marker.symbol) == ["circle" if e else "circle-open" for e in excludes]
    assert "b − a" in fig.layout.yaxis.title.text and "layer" in fig.layout.xaxis.title.text
    assert "zero" in how_to_read(fig)


def test_branch_figure_groups_three_components_per_model():
    branch = make_branch()
    fig = branch_figure(branch)
    models = list(dict.fromkeys(branch.model))
    comps = ["mixer_1", "-λ·mixer_2", "block"]
    assert len(fig.data) == len(models) * len(comps)
    assert fig.layout.barmode == "group"
    assert [t.name for t in fig.data] == comps * len(models)
    assert [t.showlegend for t in fig.data] == [True] * 3 + [False] * 3  # legend lists each once
    yaxes = [t.yaxis for t in fig.data]
    assert yaxes[:3] == ["y"] * 3 and yaxes[3:] == ["y2"] * 3  # one subplot row per model
    colours = {c: {t.marker.color for t in fig.data if t.name == c} for c in comps}
    assert all(len(v) == 1 for v in colours.values())  # same colour for a component in every row
    assert len({next(iter(v)) for v in colours.values()}) == 3  # distinct across components
    for k, t in enumerate(fig.data):
        model, comp = models[k // 3], comps[k % 3]
        ref = branch[(branch.model == model) & (branch.component == comp)].sort_values("layer")
        assert list(t.x) == ref["layer"].tolist()
        np.testing.assert_allclose(_values(t.y), ref["value"])
    assert {a.text for a in fig.layout.annotations} >= set(models)  # subplot titles
    assert "block index" in fig.layout.xaxis2.title.text
    assert "logit" in fig.layout.yaxis.title.text and fig.layout.title.text
    assert "λ" in how_to_read(fig)


def test_attention_heatmaps_token_labels_and_centred_differential_scale():
    entry = make_attention()
    fig = attention_figure(entry)
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert [a.text for a in fig.layout.annotations] == ["branch 1", "branch 2", "differential"]
    assert fig.layout.title.text == entry["title"]
    for axis in (fig.layout.xaxis, fig.layout.xaxis2, fig.layout.xaxis3, fig.layout.yaxis):
        assert list(axis.tickvals) == list(range(6))
        # duplicate tokens keep their own column; '<' is escaped for plotly, newline made visible
        assert list(axis.ticktext) == ["&lt;context&gt;", "↵", " Mary", " went", " the", " the"]
    assert fig.layout.yaxis.autorange == "reversed"  # query position 0 at the top
    diff = fig.data[2]
    m = np.abs(entry["maps"]["differential"]).max()
    assert diff.zmin == pytest.approx(-m) and diff.zmax == pytest.approx(m)
    np.testing.assert_allclose(_values(diff.z), entry["maps"]["differential"])
    # diverging: near-white at its centre (value 0, since zmin = -zmax), blue low end, red high
    stops = {round(pos, 6): plotly.colors.unlabel_rgb(c) for pos, c in diff.colorscale}
    assert min(stops[0.5]) > 200
    low, high = stops[0.0], stops[1.0]
    assert low[2] > low[0] and high[0] > high[2]
    for branch_map in fig.data[:2]:  # non-negative branch maps: sequential, auto range
        assert branch_map.zmin is None and branch_map.colorscale != diff.colorscale
    assert len({t.colorbar.x for t in fig.data}) == 3  # one colour bar per panel, no overlap
    assert "centred" in how_to_read(fig)


def test_attention_entry_validation():
    entry = make_attention()
    bad = dict(entry, maps={"branch 1": np.zeros((6, 5))})
    with pytest.raises(DiffMambaError, match=r"'branch 1'.*\(6, 5\)"):
        attention_figure(bad)
    with pytest.raises(DiffMambaError, match="tokens"):
        attention_figure({"title": "x", "maps": entry["maps"]})


def test_figure_builders_name_missing_columns():
    with pytest.raises(DiffMambaError, match="summary is missing required column.*ci_high"):
        needle_prob_figure(make_summary().drop(columns=["ci_high"]))
    with pytest.raises(DiffMambaError, match="paired.*diff_mean"):
        paired_figure(make_paired().drop(columns=["diff_mean"]))
    with pytest.raises(DiffMambaError, match="branch.*component"):
        branch_figure(make_branch().drop(columns=["component"]))


# -------------------------------------------------------------------------------------- HTML


def _markup_without_script_bodies(page: str) -> str:
    """The page's tags and text with every inline <script> body removed (tags kept)."""
    return re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", page,
                  flags=re.DOTALL | re.IGNORECASE)


def test_html_report_is_self_contained(full_report):
    path, n_figures = full_report
    assert path.is_file() and path.parent.name == "dir"  # parent directories were created
    page = path.read_text(encoding="utf-8")
    # plotly.js bundle inlined exactly once
    bundle_head = get_plotlyjs()[:400]
    assert page.count(bundle_head) == 1
    assert page.count("* plotly.js v") == 1
    markup = _markup_without_script_bodies(page)
    # no network references in any src/href attribute (absolute or protocol-relative)
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", markup, re.I)
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", markup, re.I)  # every script is inline
    assert not re.search(r"<link\b", markup, re.I)  # no external stylesheets or fonts
    assert "mathjax" not in markup.lower() and "@import" not in page and "@font-face" not in page
    assert "cdn.plot.ly" not in markup
    # every figure: its graph div, one newPlot call and one reading guide
    ids = re.findall(r'<div id="(fig-[\w-]+)" class="plotly-graph-div"', page)
    assert len(ids) == n_figures == 8
    assert set(ids) == {"fig-needle-prob-linear", "fig-needle-prob-log", "fig-curves-snr-db",
                        "fig-curves-distractor-ratio", "fig-paired-prob", "fig-paired-snr-db",
                        "fig-branch", "fig-attention-0"}
    assert page.count("Plotly.newPlot(") == n_figures
    assert markup.count('<p class="how">') == n_figures
    assert f'<meta name="diffmamba-figures" content="{n_figures}">' in page
    # sections, title (escaped), tables and meta
    for heading in ("Needle probability per layer", "Signal-to-noise and other lens measures",
                    "Paired differences between models", "Branch decomposition",
                    "Implicit attention maps", "Tables"):
        assert heading in markup
    assert "<title>Diff-Mamba vs Mamba &lt;synthetic&gt;</title>" in page
    assert re.search(r'<table[^>]*class="[^"]*dm-table', markup)
    assert "headline numbers" in markup and "11.21" in markup and "Diff-Mamba" in markup
    meta = re.search(r'<table class="dm-meta" id="meta">(.*?)</table>', markup, re.S).group(1)
    for text in ("mamba2-370M", "diffmamba2-370M", "babilong 0k qa1", "tuned", "200",
                 "diffmamba-interp", "date"):
        assert text in meta


def test_html_optional_sections_omitted(tmp_path):
    summary = make_summary()
    summary = summary[summary.measure != "distractor_ratio"]
    out = write_report(tmp_path / "min.html", title="minimal", summary=summary)
    assert out == tmp_path / "min.html"
    page = out.read_text(encoding="utf-8")
    markup = _markup_without_script_bodies(page)
    n = expected_figure_count(summary, None, None, None)
    assert n == 3 and page.count("Plotly.newPlot(") == n
    assert page.count(get_plotlyjs()[:400]) == 1
    for absent in ("Paired differences", "Branch decomposition", "Implicit attention", "Tables"):
        assert absent not in markup
    assert not re.search(r"<table[^>]*dm-table", markup)
    assert "Signal-to-noise" in markup and "Needle probability per layer" in markup


def test_write_report_rejects_bad_columns(tmp_path):
    target = tmp_path / "bad.html"
    with pytest.raises(DiffMambaError) as err:
        write_report(target, title="t", summary=make_summary().drop(columns=["ci_low", "median"]))
    assert "median" in str(err.value) and "ci_low" in str(err.value)
    assert "\n" not in str(err.value)  # one-line message for the CLI
    with pytest.raises(DiffMambaError, match="paired.*model_b"):
        write_report(target, title="t", summary=make_summary(),
                     paired=make_paired().drop(columns=["model_b"]))
    with pytest.raises(DiffMambaError, match="branch.*value"):
        write_report(target, title="t", summary=make_summary(),
                     branch=make_branch().rename(columns={"value": "contribution"}))
    assert not target.exists()  # nothing written on bad input


# -------------------------------------------------------------------------------- browser


needs_chromium = pytest.mark.skipif(
    browser.find_chromium() is None,
    reason="no chromium binary (/usr/bin/chromium or on PATH); `make chromium` installs it",
)


@needs_chromium
def test_report_renders_in_headless_chromium(full_report):
    path, n_figures = full_report
    result = browser.check_page_in_chromium(path)
    assert result["errors"] == [], result
    assert result["graph_divs"] == n_figures
    assert result["plots"] == n_figures and result["drawn"] == n_figures, result
    assert result["external_requests"] == []
    assert result["plotly_version"]


@needs_chromium
def test_browser_probe_reports_script_errors(tmp_path):
    # guards against a vacuous check: a broken page must show up as errors and 0 plots drawn
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title></head><body>'
                    '<div class="plotly-graph-div"></div>'
                    '<script>console.error("logged failure"); throw new Error("boom");</script>'
                    "</body></html>", encoding="utf-8")
    result = browser.check_page_in_chromium(page, virtual_time_budget_ms=2000)
    joined = " | ".join(result["errors"])
    assert "boom" in joined and "logged failure" in joined
    assert result["graph_divs"] == 1 and result["drawn"] == 0
