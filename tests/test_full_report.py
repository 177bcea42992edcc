"""The whole report (`jobs.full_report`) on two tiny checkpoints, read the way a user reads it: every
figure drawn in headless Chromium with no console error, every legend entry named, the size kept in
check, a warning box below the minimum number of stories, λ and accuracy that match the models."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diffmamba_interp.analysis.lens import TunedLens
from diffmamba_interp.analysis.stats import proportion_interval, wilson_interval
from diffmamba_interp.jobs import REPORT_ATTENTION_SIDE, full_report, lambda_table
from diffmamba_interp.schemas import MIN_CLUSTERS

_spec = importlib.util.spec_from_file_location("dm_full_report_browser", Path(__file__).with_name("browser.py"))
browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(browser)

N_EXAMPLES = 6  # fewer stories than MIN_CLUSTERS: the page must warn
MAX_BYTES = 7 * 2**20  # plotly.js (~4.7 MB) once, plus the figures' data


@pytest.fixture(scope="module")
def report(tiny_model, tokenizer, tmp_path_factory):
    """(run, path of the HTML, its text) of `full_report` on a tiny Mamba-2 and Diff-Mamba-2."""
    root = tmp_path_factory.mktemp("full-report")
    paths = []
    for seed, arch in enumerate(("mamba2", "diffmamba2")):
        model = tiny_model(arch, seed=seed, d_model=32, vocab_size=len(tokenizer), head_dim=16, d_state=8, chunk_size=64)
        model.tokenizer = tokenizer
        model.save_pretrained(root / arch)
        TunedLens(model).save(root / arch)
        paths.append(str(root / arch))
    run, path = full_report(paths, data="babi:qa1", n=N_EXAMPLES, out=root / "report.html", progress=False)
    return run, path, path.read_text(encoding="utf-8")


figures_of, legend_problems = browser.figures_of, browser.legend_problems  # what the page's figures hold


def test_every_legend_names_every_trace(report):
    _, _, page = report
    figures = figures_of(page)
    assert len(figures) == int(re.search(r'name="diffmamba-figures" content="(\d+)"', page).group(1))
    problems = {fid: p for fid, (data, layout) in figures.items() if (p := legend_problems(data, layout))}
    assert problems == {}
    data, _ = figures["fig-branch"]  # the plain model comes first: its row has no branch bars
    assert sorted(t["name"] for t in data if t.get("showlegend", True)) == ["-λ·mixer_2", "block", "mixer_1"]


def test_the_legend_check_catches_an_unnamed_or_hidden_component():
    bars = [{"type": "bar", "name": "block", "x": [0]}, {"type": "bar", "name": "mixer_1", "x": [0], "showlegend": False,
                                                         "legendgroup": "mixer_1"}]
    assert legend_problems(bars, {}) == ["legend group 'mixer_1' has no entry"]
    assert legend_problems([{"type": "scatter", "name": " ", "x": [1]}], {}) == ["a trace in the legend has no name: scatter"]


@pytest.mark.skipif(browser.find_chromium() is None, reason="no chromium binary; `make chromium` installs it")
def test_the_full_report_draws_every_figure_in_chromium(report):
    _, path, page = report
    result = browser.check_page_in_chromium(path, virtual_time_budget_ms=20000, timeout=150)
    n = len(figures_of(page))
    assert n >= 15, n  # accuracy, needle ×2, 4 measures, 5 paired, λ, branch, attention ×2, needle share, patching ×2
    assert result["errors"] == [], result
    assert result["graph_divs"] == result["plots"] == result["drawn"] == n, result
    assert result["external_requests"] == []


def test_the_page_stays_small_with_plotly_once(report):
    _, path, page = report
    assert path.stat().st_size < MAX_BYTES
    assert page.count("* plotly.js v") == 1


def test_few_stories_put_a_warning_box_on_the_page(report):
    run, _, page = report
    assert run.result.summary["n_clusters"].max() < MIN_CLUSTERS
    box = re.search(r'<div class="dm-warning" role="alert">(.*?)</div>', page, re.S)
    assert box and f"fewer than {MIN_CLUSTERS}" in box.group(1)
    assert page.index("dm-warning") < page.index("<nav>")  # above the contents, where it is seen
    assert not run.result.paired["significant"].any()


def test_the_attention_maps_are_bounded_and_share_one_colour_scale(report):
    _, _, page = report
    figures = figures_of(page)
    maps = [(data, layout) for fid, (data, layout) in figures.items() if fid.startswith("fig-attention")]
    assert len(maps) == 2
    ranges = {(layout["coloraxis"]["cmin"], layout["coloraxis"]["cmax"]) for _, layout in maps}
    assert len(ranges) == 1 and next(iter(ranges))[0] == -next(iter(ranges))[1]  # shared, symmetric
    for data, layout in maps:
        assert all(len(t["z"]) <= REPORT_ATTENTION_SIDE for t in data)
    plain, diff = (layout["meta"]["how_to_read"] for _, layout in maps)
    assert "differential" not in plain and "differential" in diff


def test_lambda_table_reads_every_differential_block(report):
    run, _, page = report
    diff = run.models[1]
    table = lambda_table(run.models)
    assert set(table["model"]) == {diff.label}  # the plain model has no λ
    for _, row in table.iterrows():
        block = diff.blocks[int(row["block"])]
        found = block if hasattr(block, "lam") else block.mixer
        assert row["lambda"] == pytest.approx(float(found.lam().detach()))
    assert "λ per differential block" in page


def test_accuracy_is_rank_one_at_the_final_layer_with_a_story_clustered_interval(report):
    run, _, _ = report
    acc = run.accuracy_table().set_index("model")
    for model in run.models:
        row = acc.loc[model.label]
        answers = [model.tokenizer.encode(" " + p.answer, add_special_tokens=False)[0] for p in run.prompts]
        with torch.no_grad():  # the model's own argmax at the last position, no lens involved
            top = [int(model(model.to_tokens(p.prompt))[0, -1].argmax()) for p in run.prompts]
        assert row["n"] == N_EXAMPLES and row["correct"] == sum(t == a for t, a in zip(top, answers))
        stories = [p.meta["story"] for p in run.prompts]
        lo, hi, deff = proportion_interval([t == a for t, a in zip(top, answers)], stories)
        assert (row["ci_low"], row["ci_high"], row["deff"]) == pytest.approx((lo, hi, deff))
        expected = wilson_interval(row["correct"] / deff, row["n"] / deff)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((float(expected[0]), float(expected[1])))
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]


def test_accuracy_reads_the_final_layer_per_task_and_length():
    from types import SimpleNamespace

    from diffmamba_interp.data.babilong import Prompt
    from diffmamba_interp.jobs import SnrRun

    prompts = [Prompt("p", "a", task="qa1", meta={"length": n}) for n in (0, 0, 1024)] + [Prompt("p", "b", task="qa2")]
    ranks = {0: [1, 1, 1, 1], 2: [1, 3, 1, 1]}  # layer 0 would say 100%; the final layer (2) is what counts
    rows = [dict(model="m", example=e, story=e, layer=layer, paper_layer=None, rank=r)
            for layer, rs in ranks.items() for e, r in enumerate(rs)]
    result = SimpleNamespace(per_example=pd.DataFrame(rows), labels=["m"])
    acc = SnrRun({"spec": "x"}, "logit", [], prompts, result).accuracy_table()
    assert list(acc["task"]) == ["qa1 · 0k", "qa1 · 1k", "qa2"]
    assert list(acc["n"]) == [2, 1, 1] and list(acc["correct"]) == [1, 1, 1]
    assert list(acc["accuracy"]) == [0.5, 1.0, 1.0] and acc["ci_high"].iloc[1] == 1.0


def test_wilson_interval_matches_the_closed_form():
    lo, hi = wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    np.testing.assert_allclose(lo, [0.0, 0.2366, 0.7225], atol=1e-4)
    np.testing.assert_allclose(hi, [0.2775, 0.7634, 1.0], atol=1e-4)


def test_story_clustered_interval_by_hand():
    # two stories of two questions: all right in one, all wrong in the other. s = (2, 0), m = (2, 2),
    # p = 1/2: V_cluster = 2/1 * ((2 - 1)^2 + (0 - 1)^2) / 4^2 = 1/4, V_iid = (1/4)/4 = 1/16, deff = 4,
    # so the interval is Wilson's for 0.5 of n = 1
    lo, hi, deff = proportion_interval([1, 1, 0, 0], ["a", "a", "b", "b"])
    assert deff == pytest.approx(4.0) and (lo, hi) == pytest.approx(tuple(map(float, wilson_interval(0.5, 1.0))))
    # one right and one wrong in each story: no clustering at all (deff floors at 1) -> plain Wilson(2, 4)
    lo, hi, deff = proportion_interval([1, 0, 1, 0], ["a", "a", "b", "b"])
    assert deff == 1.0 and (lo, hi) == pytest.approx(tuple(map(float, wilson_interval(2, 4))))
    assert proportion_interval([1, 0, 1], None)[:2] == pytest.approx(tuple(map(float, wilson_interval(2, 3))))
    lo, hi, deff = proportion_interval([1, 1, 1, 1], ["a", "a", "b", "b"])  # 100%: sane, not degenerate
    assert deff == 1.0 and hi == 1.0 and lo == pytest.approx(float(wilson_interval(4, 4)[0]))


def test_the_per_example_table_has_a_row_per_model_example_and_layer(report):
    run, _, _ = report
    table = run.per_example_table()
    n_layers = run.models[0].cfg.n_layers + 1
    assert len(table) == 2 * N_EXAMPLES * n_layers
    assert not table.duplicated(["model", "example", "layer"]).any()
    for column in ("task", "answer", "prob", "logprob", "rank", "snr_db", "distractor_ratio", "distractor_log_ratio"):
        assert column in table.columns
    assert set(table["task"]) == {"qa1"}
    assert list(table[table.model == run.models[0].label].drop_duplicates("example")["answer"]) == \
        [p.answer for p in run.prompts]


def test_min_clusters_is_the_threshold_of_significant():
    from diffmamba_interp.analysis.stats import BootstrapResult

    assert BootstrapResult.__dataclass_fields__["min_n"].default == MIN_CLUSTERS
