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


def _needle_ref(summary, model):
    return summary[(summary.model == model) & (summary.measure == "prob")].sort_values("layer")


def test_needle_prob_linear_bars_grouped_with_ci_whiskers():
    summary = make_summary()
    fig = needle_prob_figure(summary, log_scale=False)
    assert [t.type for t in fig.data] == ["bar", "bar"]
    assert [t.name for t in fig.data] == list(MODELS)
    assert fig.layout.barmode == "group"
    assert fig.data[0].marker.color != fig.data[1].marker.color
    for trace, model in zip(fig.data, MODELS):
        ref = _needle_ref(summary, model)
        assert list(trace.x) == list(LAYERS)
        np.testing.assert_allclose(_values(trace.y), ref["mean"])
        assert trace.error_y.symmetric is False
        np.testing.assert_allclose(_values(trace.error_y.array), ref["ci_high"] - ref["mean"])
        np.testing.assert_allclose(_values(trace.error_y.arrayminus), ref["mean"] - ref["ci_low"])
    assert fig.layout.yaxis.type != "log" and "log" not in fig.layout.title.text
    assert "layer" in fig.layout.xaxis.title.text and "paper" in fig.layout.xaxis.title.text
    assert "probability" in fig.layout.yaxis.title.text
    assert "needle" in how_to_read(fig) and "whisker" in how_to_read(fig)


def test_needle_prob_log_axis_draws_points_not_bars_with_readable_ticks():
    summary = make_summary()
    fig = needle_prob_figure(summary, log_scale=True)
    assert [t.type for t in fig.data] == ["scatter", "scatter"]  # bars on a log axis exaggerate gaps
    assert all(t.mode == "markers" for t in fig.data) and fig.layout.scattermode == "group"
    for trace, model in zip(fig.data, MODELS):
        ref = _needle_ref(summary, model)
        np.testing.assert_allclose(_values(trace.y), ref["mean"])
        np.testing.assert_allclose(_values(trace.error_y.arrayminus), ref["mean"] - ref["ci_low"])
    assert fig.layout.yaxis.type == "log" and "log" in fig.layout.title.text
    # explicit 1-2-5 ticks as decimals, never plotly's bare-digit minor labels ("7 6 5 4 3 2 0.1 9 8")
    assert fig.layout.yaxis.tickmode == "array"
    assert list(fig.layout.yaxis.ticktext) == ["0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5"]
    np.testing.assert_allclose(_values(fig.layout.yaxis.tickvals), [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    assert "point" in how_to_read(fig)


def test_log_ticks_keep_powers_of_ten_past_three_decades():
    from diffmamba_interp.report.figures import log_ticks

    vals, text = log_ticks([3e-7, 0.02, np.nan, 0.0])
    np.testing.assert_allclose(vals, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    assert text == ["10<sup>-6</sup>", "10<sup>-5</sup>", "10<sup>-4</sup>", "0.001", "0.01"]
    assert log_ticks([0.0, -1.0]) == ([], [])


def test_every_per_layer_hover_names_the_papers_layer():
    summary, paired = make_summary(), make_paired()
    figs = [needle_prob_figure(summary), needle_prob_figure(summary, log_scale=True),
            measure_curves_figure(summary, "snr_db"), paired_figure(paired, "prob")]
    for fig in figs:
        hovered = [t for t in fig.data if t.hovertemplate]
        assert hovered, fig.layout.title.text
        for t in hovered:
            labels = [row[0] for row in t.customdata]
            assert labels[0] == "layer 0 (embeddings; not in the paper)" and labels[2] == "layer 2 (paper 1)"
            assert "%{customdata[0]}" in t.hovertemplate
        assert "the paper's layer k − 1" in fig.layout.xaxis.title.text


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
    line, points = fig.data  # the named line with whiskers, and its markers in the same legend group
    ref = paired[paired.measure == "prob"].sort_values("layer")
    assert line.name == f"{MODELS[1]} − {MODELS[0]}" and line.showlegend is not False
    assert points.showlegend is False and points.legendgroup == line.legendgroup
    for t in (line, points):
        np.testing.assert_allclose(_values(t.y), ref["diff_mean"])
    np.testing.assert_allclose(_values(line.error_y.array), ref["ci_high"] - ref["diff_mean"])
    np.testing.assert_allclose(_values(line.error_y.arrayminus), ref["diff_mean"] - ref["ci_low"])
    zero = [s for s in fig.layout.shapes if s.y0 == 0 and s.y1 == 0]
    assert len(zero) == 1
    # without a `significant` column: filled marker exactly where the CI excludes zero (layers 3 and 4 here)
    excludes = ((ref["ci_low"] > 0) | (ref["ci_high"] < 0)).tolist()
    assert excludes == [False, False, False, True, True]
    assert list(points.marker.symbol) == ["circle" if e else "circle-open" for e in excludes]
    assert "b − a" in fig.layout.yaxis.title.text and "layer" in fig.layout.xaxis.title.text
    assert "zero" in how_to_read(fig) and "open markers" in how_to_read(fig)


def test_paired_markers_follow_the_significant_column_and_never_a_zero_width_interval():
    paired = make_paired()
    paired = paired[paired.measure == "prob"].copy()
    paired.loc[paired.layer == 0, ["diff_mean", "ci_low", "ci_high"]] = -1e-6  # zero width, excludes 0
    paired["significant"] = [True, False, False, False, True]  # e.g. layer 3: too few stories
    symbols = list(paired_figure(paired, "prob").data[1].marker.symbol)
    assert symbols == ["circle-open", "circle-open", "circle-open", "circle-open", "circle"]
    no_column = paired.drop(columns="significant")
    assert list(paired_figure(no_column, "prob").data[1].marker.symbol)[0] == "circle-open"


@pytest.mark.parametrize("measure, words", [("prob", "higher than"), ("snr_db", "reads the needle better"),
                                            ("rank", "reads it worse (lower is better)")])
def test_paired_how_to_read_says_which_way_is_better(measure, words):
    paired = make_paired().assign(measure=measure)
    how = how_to_read(paired_figure(paired, measure))
    assert words in how
    assert ("worse" in how) is (measure == "rank")


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
        assert [row[0] for row in t.customdata][:2] == ["block 0 (writes layer 1; paper 0)",
                                                        "block 1 (writes layer 2; paper 1)"]
    assert {a.text for a in fig.layout.annotations} >= set(models)  # subplot titles
    assert "block index" in fig.layout.xaxis2.title.text and "paper" in fig.layout.xaxis2.title.text
    assert "logit" in fig.layout.yaxis.title.text and fig.layout.title.text
    assert "λ" in how_to_read(fig)


def test_branch_legend_names_every_component_when_the_first_model_is_plain():
    plain = pd.DataFrame({"model": "mamba2", "layer": range(4), "component": "block", "value": 1.0})
    fig = branch_figure(pd.concat([plain, make_branch()], ignore_index=True))
    in_legend = [t.name for t in fig.data if t.showlegend is not False]
    assert sorted(in_legend) == sorted(["block", "mixer_1", "-λ·mixer_2"])  # each once, all named
    assert all(len(t.x) for t in fig.data)  # no empty trace stands in for a component a model lacks


def test_attention_heatmaps_token_labels_and_one_shared_centred_scale():
    entry = make_attention()
    fig = attention_figure(entry)
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert [a.text for a in fig.layout.annotations] == ["branch 1", "branch 2", "differential"]
    assert fig.layout.title.text == entry["title"]
    positions = ["0: &lt;context&gt;", "1: ↵", "2:  Mary", "3:  went", "4:  the", "5:  the"]
    for axis in (fig.layout.xaxis, fig.layout.xaxis2, fig.layout.xaxis3, fig.layout.yaxis):
        assert axis.type == "category" and list(axis.tickvals) == positions
        # duplicate tokens keep their own column; '<' is escaped for plotly, newline made visible
        assert list(axis.ticktext) == ["&lt;context&gt;", "↵", " Mary", " went", " the", " the"]
    assert list(fig.data[0].x) == list(fig.data[0].y) == positions  # the hover shows position and token
    assert fig.data[0].customdata is None  # no text per cell: the page grows with n, not n²
    assert fig.layout.yaxis.autorange == "reversed"  # query position 0 at the top
    # one colour axis for every panel, symmetric around 0 over all maps, so the branches compare by eye
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    m = max(np.abs(z).max() for z in entry["maps"].values())
    assert fig.layout.coloraxis.cmin == pytest.approx(-m) and fig.layout.coloraxis.cmax == pytest.approx(m)
    np.testing.assert_allclose(_values(fig.data[2].z), entry["maps"]["differential"])
    stops = {round(pos, 6): plotly.colors.unlabel_rgb(c) for pos, c in fig.layout.coloraxis.colorscale}
    assert min(stops[0.5]) > 200  # near-white at 0, blue low end, red high end
    assert stops[0.0][2] > stops[0.0][0] and stops[1.0][0] > stops[1.0][2]
    assert all(t.colorbar.x is None for t in fig.data)  # one colour bar (the colour axis's), none per panel
    assert "centred" in how_to_read(fig) and "differential" in how_to_read(fig)


def test_attention_ticks_of_side_by_side_panels_do_not_crowd():
    tokens = [f" token{i}" for i in range(70)]
    maps = {name: np.tril(np.ones((70, 70))) for name in ("branch 1", "branch 2", "differential")}
    fig = attention_figure({"title": "t", "tokens": tokens, "maps": maps})
    assert fig.layout.xaxis.tickangle == -90  # upright labels never reach into the next panel
    assert len(fig.layout.xaxis.tickvals) <= 24 and all(len(t) <= 12 for t in fig.layout.xaxis.ticktext)
    single = attention_figure({"title": "t", "tokens": tokens, "maps": {"layer": maps["branch 1"]}})
    assert len(single.layout.xaxis.tickvals) == 70  # one wide panel has room for every label
    assert list(single.data[0].x) == [f" token{i}" for i in range(70)]  # distinct labels are their own categories


def test_a_plain_layer_has_no_differential_reading_and_a_sequential_scale_from_zero():
    entry = {"title": "mamba: block 0", "tokens": TOKENS, "maps": {"layer": np.tril(np.ones((6, 6))) * 0.5}}
    fig = attention_figure(entry)
    assert "differential" not in how_to_read(fig).lower()
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 0.5)
    shared = attention_figure(entry, zrange=(-2.0, 2.0))  # the report's scale, shared with other figures
    assert (shared.layout.coloraxis.cmin, shared.layout.coloraxis.cmax) == (-2.0, 2.0)


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


# ---------------------------------------------------------------------- report sections (issue 18)


def make_accuracy() -> pd.DataFrame:
    return pd.DataFrame({"model": [MODELS[0], MODELS[0], MODELS[1], MODELS[1]], "task": ["qa1", "qa2"] * 2,
                         "n": [20, 20, 20, 20], "correct": [10, 20, 15, 0], "accuracy": [0.5, 1.0, 0.75, 0.0],
                         "ci_low": [0.3, 0.84, 0.53, 0.0], "ci_high": [0.7, 1.0, 0.89, 0.16], "deff": [1.0, 1.0, 1.3, 1.0]})


def make_lambdas() -> pd.DataFrame:
    return pd.DataFrame({"model": [MODELS[1]] * 2, "block": [0, 2], "lambda": [1.12, 0.3], "lambda_init": [0.2, 0.47]})


def test_accuracy_figure_points_with_interval_per_task_and_model():
    from diffmamba_interp.report import accuracy_figure

    acc = make_accuracy()
    fig = accuracy_figure(acc)
    assert [t.name for t in fig.data] == list(MODELS) and all(t.mode == "markers" for t in fig.data)
    second = fig.data[1]
    assert list(second.x) == ["qa1", "qa2"] and list(second.y) == [0.75, 0.0]
    np.testing.assert_allclose(_values(second.error_y.array), [0.14, 0.16])
    np.testing.assert_allclose(_values(second.error_y.arrayminus), [0.22, 0.0])
    assert list(fig.layout.yaxis.range) == [0, 1.05] and "Wilson" in how_to_read(fig)
    with pytest.raises(DiffMambaError, match="accuracy.*ci_high"):
        accuracy_figure(acc.drop(columns="ci_high"))


def test_lambda_figure_one_line_per_model_with_lambda_init():
    from diffmamba_interp.report import lambda_figure

    fig = lambda_figure(make_lambdas())
    lam, init = fig.data
    assert list(lam.x) == [0, 2] and list(lam.y) == [1.12, 0.3] and list(init.y) == [0.2, 0.47]
    assert lam.name.endswith("λ") and init.name.endswith("λ_init") and lam.legendgroup == init.legendgroup
    assert [row[0] for row in lam.customdata] == ["block 0 (writes layer 1; paper 0)", "block 2 (writes layer 3; paper 2)"]
    assert "paper" in fig.layout.xaxis.title.text


def _with_log_ratio(df: pd.DataFrame) -> pd.DataFrame:
    ratio = df[df.measure == "distractor_ratio"] if "distractor_ratio" in set(df.measure) else df[df.measure == "prob"]
    return pd.concat([df, ratio.assign(measure="distractor_log_ratio")], ignore_index=True)


def test_report_draws_the_log_distractor_ratio_in_place_of_the_raw_one(tmp_path):
    paired = make_paired()
    paired = pd.concat([paired, paired[paired.measure == "prob"].assign(measure="distractor_ratio")], ignore_index=True)
    out = write_report(tmp_path / "r.html", title="t", summary=_with_log_ratio(make_summary()),
                       paired=_with_log_ratio(paired))
    ids = set(re.findall(r'<div id="(fig-[\w-]+)" class="plotly-graph-div"', out.read_text()))
    assert {"fig-curves-distractor-log-ratio", "fig-paired-distractor-log-ratio"} <= ids
    assert not {i for i in ids if i.endswith("distractor-ratio")}  # no raw-ratio figure spanning ±thousands
    assert "compared on its log" in out.read_text()


def test_report_warns_below_the_minimum_number_of_stories(tmp_path):
    from diffmamba_interp.schemas import MIN_CLUSTERS, few_clusters_warning

    few = make_summary().assign(n_clusters=MIN_CLUSTERS - 1)
    page = write_report(tmp_path / "few.html", title="t", summary=few).read_text()
    box = re.findall(r'<div class="dm-warning" role="alert">(.*?)</div>', page, re.S)
    assert len(box) == 1 and f"only {MIN_CLUSTERS - 1} stories" in box[0]
    enough = make_summary().assign(n_clusters=MIN_CLUSTERS)
    page = write_report(tmp_path / "ok.html", title="t", summary=enough, warnings=["made-up caveat"]).read_text()
    assert page.count('class="dm-warning"') == 1 and "made-up caveat" in page
    assert few_clusters_warning(enough) is None and few_clusters_warning(make_summary()) is None  # no column: silent
    assert "questions" in few_clusters_warning(few, "questions")


def test_report_has_accuracy_and_lambda_sections(tmp_path):
    page = write_report(tmp_path / "r.html", title="t", summary=make_summary(), accuracy=make_accuracy(),
                        lambdas=make_lambdas()).read_text()
    ids = re.findall(r'<div id="(fig-[\w-]+)" class="plotly-graph-div"', page)
    assert ids[0] == "fig-accuracy" and "fig-lambda" in ids
    assert "Task accuracy" in page and "λ per differential block" in page
    empty = make_lambdas().iloc[:0]  # only plain models: no λ section
    assert "fig-lambda" not in write_report(tmp_path / "p.html", title="t", summary=make_summary(), lambdas=empty).read_text()


def test_report_attention_figures_share_one_scale_and_take_answer_rows(tmp_path):
    plain = {"title": "plain", "tokens": TOKENS, "maps": {"layer": np.tril(np.full((6, 6), 0.25))}}
    row = {"view": "row", "title": "row", "rows": {"branch 1": [0.1, 0.2]}, "positions": [4, 5], "tokens": ["a", "b"],
           "target": 5, "marks": []}
    from diffmamba_interp.report.long_context import attention_figures

    figs = attention_figures([make_attention(), plain, row])
    m = max(np.abs(z).max() for z in make_attention()["maps"].values())
    for fig in figs[:2]:  # the plain map is drawn on the differential figure's symmetric scale
        assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == pytest.approx((-m, m))
    assert figs[2].data[0].type == "scatter"  # the answer row: line panels
    page = write_report(tmp_path / "a.html", title="t", attention=[make_attention(), plain, row]).read_text()
    assert page.count('class="plotly-graph-div"') == 3 and "shares one colour scale" in page
