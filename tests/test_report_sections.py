"""The report's sections per analysis, read the way a user reads them: attention to the needle (in
`report`), the seed-level comparison (`snr --ckpt-a/--ckpt-b --out`, `--all-seeds`, `report --all-seeds`),
accuracy by context length (`report --eval-data`) and the downsampled patching heat-map. Each page draws
every figure in headless Chromium with no console error and every legend entry named; the numbers on the
page and in the JSON are the analysis's."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from diffmamba_interp.analysis.accuracy import TASK_LABELS, accuracy_by_length, accuracy_ratio
from diffmamba_interp.analysis.needle_attention import needle_attention
from diffmamba_interp.analysis.patching import PatchingResult
from diffmamba_interp.analysis.seeds import compare_seeds
from diffmamba_interp.cli import app
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.jobs import (ACCURACY_BY_LENGTH_TABLE, eval_specs, load_models, load_prompts,
                                   shipped_seed_checkpoints)
from diffmamba_interp.report import write_report
from diffmamba_interp.report.accuracy import accuracy_wide_table, length_label
from diffmamba_interp.report.figures import PATCHING_MAX_COLUMNS, how_to_read, patching_figure
from diffmamba_interp.report.needle import needle_share_figure

_spec = importlib.util.spec_from_file_location("dm_report_sections_browser", Path(__file__).with_name("browser.py"))
browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(browser)
needs_chromium = pytest.mark.skipif(browser.find_chromium() is None, reason="no chromium binary; `make chromium` installs it")

N = 6  # examples: a handful of stories keeps the runs quick
SEEDS = {"mamba2-babi": ("mamba2", 3), "diffmamba2-babi": ("diffmamba2", 2)}  # shipped name -> arch, seeds
EVAL = ("--eval-data", "babilong:qa1,qa2:0k,500", "--eval-n", 3, "--filler", "babi")  # the accuracy-by-length section


def _favour_locations(model, tokenizer, scale: float = 8.0) -> None:
    """Scale the (tied) unembedding rows of the qa1/qa2 answers: a random model then answers with a
    location, right some of the time, so the accuracy-by-length numbers are not all 0."""
    import torch

    ids = sorted({tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in TASK_LABELS["qa1"]})
    with torch.no_grad():
        model.lm_head.weight[ids] *= scale


@pytest.fixture(scope="module")
def models_root(tiny_model, tokenizer, tmp_path_factory):
    """A models directory laid out as the shipped one with several seeds: `<name>` (seed 0) and
    `<name>-seed<k>`, tiny random models (other inits stand in for other training seeds), plus
    directories --all-seeds must pass over."""
    root = tmp_path_factory.mktemp("models")
    for name, (arch, n) in SEEDS.items():
        for k in range(n):
            model = tiny_model(arch, seed=20 + k, vocab_size=len(tokenizer), d_model=32, head_dim=16, d_state=8,
                               chunk_size=64)
            model.tokenizer = tokenizer
            _favour_locations(model, tokenizer)
            model.save_pretrained(root / (name if k == 0 else f"{name}-seed{k}"))
    shutil.copytree(root / "mamba2-babi", root / "mamba2-babi-seedless")  # not -seed<k>
    shutil.copytree(root / "mamba2-babi", root / "mamba2-babi-old")
    (root / "mamba2-babi-seed7").mkdir()  # no config.json: not a checkpoint
    return root


def expected_groups(root: Path) -> dict:
    return {name: [str(root / (name if k == 0 else f"{name}-seed{k}")) for k in range(n)]
            for name, (_, n) in SEEDS.items()}


def _run(root: Path, *args) -> tuple[int, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFMAMBA_MODELS", str(root))
        result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def seed_page(models_root, tmp_path_factory):
    """`snr --all-seeds --out --json` on the models directory -> (html path, page text, JSON)."""
    out = tmp_path_factory.mktemp("seed-page")
    code, output = _run(models_root, "snr", "--all-seeds", "--n", N, "--out", out / "seeds.html",
                        "--json", out / "seeds.json", "-q")
    assert code == 0, output
    path = out / "seeds.html"
    return path, path.read_text(encoding="utf-8"), json.loads((out / "seeds.json").read_text())


@pytest.fixture(scope="module")
def analysis(models_root, tokenizer):
    """`analysis.seeds.compare_seeds` run directly on the same checkpoints and examples."""
    groups = expected_groups(models_root)
    prompts = load_prompts("babi:qa1", N, 0, tokenizer=tokenizer)
    return compare_seeds({"mamba2": groups["mamba2-babi"], "diffmamba2": groups["diffmamba2-babi"]}, prompts,
                         lens="auto", n_boot=1000, seed=0, progress=False)


@pytest.fixture(scope="module")
def full_run(models_root, tmp_path_factory):
    """`report --all-seeds --eval-data ...` -> (html path, page text, what it printed)."""
    out = tmp_path_factory.mktemp("full-page") / "report.html"
    code, output = _run(models_root, "report", "--all-seeds", "--n", N, *EVAL, "--out", out, "-q")
    assert code == 0, output
    return out, out.read_text(encoding="utf-8"), output


@pytest.fixture(scope="module")
def full_page(full_run):
    """`report --all-seeds --eval-data ...` -> (html path, page text)."""
    return full_run[:2]


# -- --all-seeds ----------------------------------------------------------------------------------
def test_all_seeds_finds_every_seed_directory(models_root, monkeypatch):
    monkeypatch.setenv("DIFFMAMBA_MODELS", str(models_root))
    assert shipped_seed_checkpoints() == expected_groups(models_root)


def test_all_seeds_orders_by_seed_number_and_names_what_is_missing(tmp_path, monkeypatch):
    for name in ("mamba2-babi", "mamba2-babi-seed10", "mamba2-babi-seed2", "diffmamba2-babi-seed1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.setenv("DIFFMAMBA_MODELS", str(tmp_path))
    found = shipped_seed_checkpoints()
    assert [Path(p).name for p in found["mamba2-babi"]] == ["mamba2-babi", "mamba2-babi-seed2", "mamba2-babi-seed10"]
    assert [Path(p).name for p in found["diffmamba2-babi"]] == ["diffmamba2-babi-seed1"]
    shutil.rmtree(tmp_path / "diffmamba2-babi-seed1")
    with pytest.raises(DiffMambaError, match="--all-seeds: no diffmamba2-babi"):
        shipped_seed_checkpoints()


def test_report_takes_the_seed_run_rows_of_its_models_instead_of_running_them_again(models_root, monkeypatch):
    import sys

    from diffmamba_interp.jobs import run_seed_snr, run_snr

    compare_module = sys.modules["diffmamba_interp.analysis.compare"]  # the package exports the function as `compare`

    groups = expected_groups(models_root)
    seeds = run_seed_snr(groups["mamba2-babi"], groups["diffmamba2-babi"], n=N, progress=False, n_boot=50)
    pair = [groups["mamba2-babi"][0], groups["diffmamba2-babi"][0]]
    fresh = run_snr(pair, n=N, progress=False, n_boot=50)
    ran = []
    real = compare_module.target_probs
    monkeypatch.setattr(compare_module, "target_probs", lambda *a, **k: ran.append(1) or real(*a, **k))
    reused = run_snr(pair, n=N, progress=False, n_boot=50, seeds=seeds)
    assert ran == []  # both models' rows came from the seed run
    pd.testing.assert_frame_equal(reused.result.per_example, fresh.result.per_example)
    pd.testing.assert_frame_equal(reused.result.summary, fresh.result.summary)
    pd.testing.assert_frame_equal(reused.result.paired, fresh.result.paired)
    other = run_snr(pair, n=N - 1, progress=False, n_boot=50, seeds=seeds)  # another n: nothing reused
    assert len(ran) == 2 and len(other.prompts) == N - 1


def test_all_seeds_refuses_explicit_checkpoints(models_root):
    code, output = _run(models_root, "snr", "--all-seeds", "--ckpt-a", models_root / "mamba2-babi", "--n", 2)
    assert code == 2 and "--all-seeds picks the checkpoints itself" in output


# -- the seed-level page --------------------------------------------------------------------------
def test_seed_json_holds_the_analysis_numbers(seed_page, analysis, models_root):
    _, _, doc = seed_page
    groups = expected_groups(models_root)
    assert [g["name"] for g in doc["groups"]] == ["mamba2", "diffmamba2"]
    assert [g["ckpts"] for g in doc["groups"]] == [groups["mamba2-babi"], groups["diffmamba2-babi"]]
    for g in doc["groups"]:
        got = pd.DataFrame(g["rows"])
        want = analysis.summary[analysis.summary.group == g["name"]].reset_index(drop=True)
        for col in ("mean", "ci_low", "ci_high", "seed_std"):
            np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), rtol=1e-12, atol=0)
        assert list(got["n_seeds"]) == list(want["n_seeds"])
    got = pd.DataFrame(doc["paired"])
    for col in ("diff_mean", "ci_low", "ci_high"):
        np.testing.assert_allclose(got[col].astype(float), analysis.paired[col].astype(float), rtol=1e-12, atol=0)


def test_seed_figures_draw_the_analysis_numbers(seed_page, analysis):
    _, page, _ = seed_page
    figures = browser.figures_of(page)
    prob = analysis.summary[analysis.summary.measure == "prob"]
    per_example = analysis.per_example
    data, layout = figures["fig-seed-curves-prob"]
    for group, members in analysis.groups.items():
        traces = [t for t in data if t.get("legendgroup") == group]
        mean = next(t for t in traces if t["name"].startswith("seed-level mean"))
        np.testing.assert_allclose(mean["y"], prob[prob.group == group]["mean"], rtol=1e-12)
        seeds = [t for t in traces if t.get("mode") == "lines+markers" and t is not mean]
        assert [t["name"] for t in seeds] == [m.split("/", 1)[1] for m in members]  # every seed in the legend
        for t, member in zip(seeds, members):  # each seed's own mean over the examples
            want = per_example[per_example.model == member].groupby("layer")["prob"].mean()
            np.testing.assert_allclose(t["y"], want.to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(np.mean([t["y"] for t in seeds], axis=0), mean["y"], rtol=1e-12)
    assert "paper's layer" in layout["xaxis"]["title"]["text"]
    data, layout = figures["fig-seed-paired-prob"]
    paired = analysis.paired[analysis.paired.measure == "prob"]
    line = data[0]
    assert line["name"] == "diffmamba2 − mamba2"
    np.testing.assert_allclose(line["y"], paired["diff_mean"], rtol=1e-12)
    np.testing.assert_allclose(line["error_y"]["array"], paired["ci_high"] - paired["diff_mean"], rtol=1e-9, atol=1e-15)
    assert "two-level bootstrap" in layout["meta"]["how_to_read"]


def test_seed_page_has_both_sections_and_its_tables(seed_page):
    _, page, _ = seed_page
    for title in ("Across training seeds: per-seed curves and seed-level means",
                  "Across training seeds: difference between architectures",
                  "across seeds: needle probability per checkpoint"):
        assert title in page
    figures = browser.figures_of(page)
    measures = ("prob", "snr-db", "distractor-log-ratio", "logprob", "rank")  # figure ids are slugs
    assert {f"fig-seed-curves-{m}" for m in measures} | {f"fig-seed-paired-{m}" for m in measures} <= set(figures)
    assert page.count("* plotly.js v") == 1


@needs_chromium
def test_seed_page_draws_in_chromium_with_every_trace_named(seed_page):
    path, page, _ = seed_page
    figures = browser.figures_of(page)
    problems = {fid: p for fid, (data, layout) in figures.items() if (p := browser.legend_problems(data, layout))}
    assert problems == {}
    result = browser.check_page_in_chromium(path, virtual_time_budget_ms=20000, timeout=150)
    assert result["errors"] == [], result
    assert result["graph_divs"] == result["plots"] == result["drawn"] == len(figures), result
    assert result["external_requests"] == []


# -- the full report: attention to the needle and the seed sections -------------------------------
def test_the_needle_figure_draws_the_analysis_numbers(full_page, models_root, tokenizer):
    _, page = full_page
    data, layout = browser.figures_of(page)["fig-needle-attention"]
    groups = expected_groups(models_root)
    ckpts = [groups["mamba2-babi"][0], groups["diffmamba2-babi"][0]]  # the first (seed 0) of each architecture
    prompts = load_prompts("babi:qa1", N, 0, tokenizer=tokenizer)
    summary = needle_attention(load_models(ckpts), prompts, n_boot=1000, seed=0).summary
    points = [t for t in data if t.get("mode") == "markers"]
    drawn = {(t["legendgroup"], round(x)): y for t in points for x, y in zip(t["x"], t["y"])}
    models = summary.model.unique()
    for k, (axis, model) in enumerate(zip(("y", "y2"), models)):  # one row of panels per model, in order
        rows = summary[(summary.model == model) & summary["map"].isin(["layer", "branch 1", "branch 2", "differential"])]
        on_axis = {(t["legendgroup"], round(x)): y for t in points if t.get("yaxis", "y") == axis
                   for x, y in zip(t["x"], t["y"])}
        assert on_axis == pytest.approx({(r.map, r.layer): r.mean for r in rows.itertuples()}, rel=1e-12)
    assert {k[0] for k in drawn} == {"layer", "branch 1", "branch 2", "differential"}  # branches of the diff model
    assert layout["yaxis"]["range"] == layout["yaxis2"]["range"]  # one scale for every model
    assert "paper's layer" in layout["xaxis2"]["title"]["text"]
    names = {t["name"] for t in data if t.get("showlegend", True)}
    assert {"branch 1", "branch 2", "differential (branch 1 − λ·branch 2)", "plain block's map"} <= names
    assert any("uniform row" in n for n in names)


def test_the_full_report_has_every_section(full_page):
    _, page = full_page
    sections = re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', page)
    for title in ("Task accuracy", "Needle probability per layer", "Paired differences between models",
                  "Across training seeds: per-seed curves and seed-level means",
                  "Across training seeds: difference between architectures", "Attention to the needle", "Patching"):
        assert title in sections
    assert "attention to the needle: share of each block" in page  # its table


@needs_chromium
def test_the_full_report_with_seeds_draws_in_chromium(full_page):
    path, page = full_page
    figures = browser.figures_of(page)
    problems = {fid: p for fid, (data, layout) in figures.items() if (p := browser.legend_problems(data, layout))}
    assert problems == {}
    result = browser.check_page_in_chromium(path, virtual_time_budget_ms=25000, timeout=180)
    assert result["errors"] == [], result
    assert result["graph_divs"] == result["plots"] == result["drawn"] == len(figures), result
    assert path.stat().st_size < 7 * 2**20 and page.count("* plotly.js v") == 1
    assert {"fig-accuracy-generate", "fig-ratio-generate-diffmamba2-babi"} <= set(figures)  # the --eval-data section


# -- the full report: accuracy by context length (--eval-data) -------------------------------------
def _array(value) -> np.ndarray:
    """A trace's array as the page stores it: a list (None for NaN), or plotly's base64 form."""
    if isinstance(value, dict) and "bdata" in value:
        import base64

        shape = [int(k) for k in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape).astype(float)
    return np.array([[np.nan if v is None else v for v in row] for row in value], dtype=float)


def _grid(frame: pd.DataFrame, column: str) -> np.ndarray:
    """`column` as [task, length] in the figures' order (tasks as they come, lengths ascending)."""
    return frame.pivot(index="task", columns="length", values=column).sort_index(axis=1).to_numpy(dtype=float)


def _page_table(df: pd.DataFrame) -> str:
    """A table as the page renders it (`page._Page.table`)."""
    return df.to_html(classes="dm-table", border=0, index=False, escape=True, na_rep="–",
                      float_format=lambda x: f"{x:.4g}")


@pytest.fixture(scope="module")
def expected_accuracy(models_root, tokenizer):
    """`accuracy_by_length` run directly on the report's models (the first checkpoint of each architecture,
    as the report's other sections) and the same prompts."""
    groups = expected_groups(models_root)
    models = load_models([groups["mamba2-babi"][0], groups["diffmamba2-babi"][0]])
    prompts = [p for spec in eval_specs(EVAL[1])
               for p in load_prompts(spec, EVAL[3], 0, tokenizer=tokenizer, filler="babi")]
    return accuracy_by_length(models, prompts, progress=False)


def test_the_length_accuracy_section_holds_the_analysis_numbers(full_run, expected_accuracy):
    _, page, output = full_run
    table = expected_accuracy.table
    assert expected_accuracy.labels == ["mamba2-babi", "diffmamba2-babi"]
    assert set(table["task"]) == {"qa1", "qa2"} and set(table["length"]) == {0, 500} and (table["n"] == 3).all()
    assert table["accuracy_argmax"].max() > 0 and table["accuracy_generate"].max() > 0  # not a page of zeros
    figures = browser.figures_of(page)
    for scorer in ("generate", "argmax"):
        data, _ = figures[f"fig-accuracy-{scorer}"]
        assert [t["name"] for t in data] == expected_accuracy.labels  # one named panel per model, in order
        for trace, label in zip(data, expected_accuracy.labels):
            assert trace["y"] == ["qa1", "qa2"] and trace["x"] == ["0k", "500"]
            want = _grid(table[table.model == label], f"accuracy_{scorer}")
            np.testing.assert_allclose(_array(trace["z"]), want, rtol=0, atol=0)
        (ratio,), _ = figures[f"fig-ratio-{scorer}-diffmamba2-babi"]
        want = _grid(accuracy_ratio(table, "mamba2-babi", "diffmamba2-babi", scorer), "ratio")
        np.testing.assert_allclose(_array(ratio["customdata"])[..., 0], want, rtol=1e-12, equal_nan=True)
    # its table in the section, and the full one (95% intervals) and the ratios under Tables
    assert _page_table(accuracy_wide_table(table)) in page
    assert _page_table(table.round(4)) in page and ACCURACY_BY_LENGTH_TABLE in page
    assert "accuracy by context length: ratio to the first model" in page
    # and printed after the per-layer table
    printed = "\n".join(" ".join(line.split()) for line in output.splitlines())
    for row in table.itertuples():
        assert f"{row.model} {row.task} {length_label(row.length)} {row.n} {row.accuracy_argmax:.4f}" in printed


def test_the_length_accuracy_section_reads_as_one_section(full_page):
    _, page = full_page
    sections = re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', page)
    assert sections.index("Accuracy by context length") == sections.index("Task accuracy") + 1
    assert page.count("* plotly.js v") == 1  # the section adds figures, not another plotly.js
    assert "accuracy by task and context length, and the ratio diffmamba2-babi / mamba2-babi" in page
    assert "babilong:qa1:0k,500, babilong:qa2:0k,500, 3 questions per task and length, babi filler" in page  # meta
    figures = browser.figures_of(page)
    ids = [f for f in figures if f.startswith(("fig-accuracy-", "fig-ratio-"))]
    assert ids == ["fig-accuracy-generate", "fig-accuracy-argmax", "fig-ratio-generate-diffmamba2-babi",
                   "fig-ratio-argmax-diffmamba2-babi"]
    for fid in ids[:2]:  # accuracy: one 0..1 colour scale, its colour bar named
        data, layout = figures[fid]
        assert {t["coloraxis"] for t in data} == {"coloraxis"}
        axis = layout["coloraxis"]
        assert (axis["cmin"], axis["cmax"], axis["colorbar"]["title"]["text"]) == (0, 1, "accuracy")
    for fid in ids[2:]:  # the paper's comparison: log2 of the ratio, centred at 1, colour bar named
        (trace,), layout = figures[fid]
        assert trace["name"] == "diffmamba2-babi / mamba2-babi" and trace["colorbar"]["title"]["text"] == "ratio"
        assert trace["zmid"] == 0 and trace["zmin"] == -trace["zmax"]
        ticks = dict(zip(trace["colorbar"]["tickvals"], trace["colorbar"]["ticktext"]))
        assert ticks[0] == "1" and "red" in layout["meta"]["how_to_read"]


def test_without_eval_data_the_report_has_no_length_accuracy_section(models_root, tmp_path, monkeypatch):
    import diffmamba_interp.jobs as jobs

    monkeypatch.setattr(jobs, "run_eval", lambda *a, **k: pytest.fail("ran the evaluation without --eval-data"))
    groups = expected_groups(models_root)
    out = tmp_path / "plain.html"
    code, output = _run(models_root, "report", "--ckpt", groups["mamba2-babi"][0],
                        "--ckpt", groups["diffmamba2-babi"][0], "--n", 4, "--out", out, "-q")
    assert code == 0, output
    page = out.read_text(encoding="utf-8")
    assert "Task accuracy" in page and "accuracy by context length" not in page.lower()
    assert not any(f.startswith(("fig-accuracy-", "fig-ratio-")) for f in browser.figures_of(page))
    assert "Accuracy by context length" not in output


def test_eval_options_are_checked_before_any_work(models_root, tmp_path, monkeypatch):
    import diffmamba_interp.jobs as jobs

    monkeypatch.setattr(jobs, "load_models", lambda ckpts: pytest.fail("loaded models before checking --eval-*"))
    monkeypatch.setattr(jobs, "run_seed_snr", lambda *a, **k: pytest.fail("ran the seeds before checking --eval-*"))
    for args, needle in [(["--eval-n", 5], "give --eval-data SPEC too"),
                         (["--eval-data", "babilong:qa1:huge"], "bad BABILong length"),
                         (["--eval-data", "nonsense"], "unknown data spec"),
                         (["--eval-data", "babilong:qa1:0k", "--eval-n", 0], "--eval-n must be"),
                         (["--all-seeds", "--eval-data", "babilong:qa1:0k", "--eval-n", -1], "--eval-n must be")]:
        code, output = _run(models_root, "report", *args, "--n", 2, "--out", tmp_path / "r.html", "-q")
        assert code == 2 and output.count("\n") == 1, (args, output)
        assert output.startswith("error: ") and needle in output, (args, output)
    assert not (tmp_path / "r.html").exists()


def test_the_needle_figure_goes_logarithmic_for_long_prompts():
    rows = [dict(model=m, layer=i, map="layer", mean=s, ci_low=s / 2, ci_high=s * 2, n=10, baseline=b)
            for m, b in (("a", 0.004), ("b", 0.004)) for i, s in enumerate((0.0005, 0.05, 0.2))]
    fig = needle_share_figure(pd.DataFrame(rows))
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range == fig.layout.yaxis2.range
    assert "logarithmic" in how_to_read(fig)
    short = needle_share_figure(pd.DataFrame(rows).assign(baseline=0.1))
    assert short.layout.yaxis.type != "log" and short.layout.yaxis.range[0] == 0


# -- patching downsampled ---------------------------------------------------------------------------
def _patching(n_positions: int, spike: int) -> PatchingResult:
    rng = np.random.default_rng(0)
    rows = [("resid_pre", layer, f"blocks.{layer}.hook_resid_pre", p, f"t{p}", float(v))
            for layer in range(3) for p, v in enumerate(rng.normal(0, 0.05, n_positions))]
    df = pd.DataFrame(rows, columns=["component", "layer", "hook", "position", "token", "value"])
    df.loc[(df.layer == 1) & (df.position == spike), "value"] = -3.0  # one strong position
    df["normalized"] = (df["value"] - 0.0) / 1.0
    return PatchingResult(df, "resid", "attribution", "logit difference", 1.0, 0.0, [f"t{p}" for p in range(n_positions)])


def test_a_long_patching_heat_map_is_downsampled_and_says_so(tmp_path):
    long, spike = _patching(5000, spike=4321), 4321
    fig = patching_figure(long)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape[0] == 3 and z.shape[1] <= PATCHING_MAX_COLUMNS
    k = int(np.ceil(5000 / PATCHING_MAX_COLUMNS))
    assert z[1, spike // k] == -3.0 and np.abs(z).max() == 3.0  # the strongest cell survives, sign and all
    assert "downsampled" in fig.layout.title.text and f"blocks of {k}" in fig.layout.xaxis.title.text
    assert "downsampled" in how_to_read(fig)
    assert "t4321" in fig.data[0].customdata[1][spike // k][1]  # the hover names the position shown
    page = write_report(tmp_path / "p.html", title="patching", patching=[long]).read_text(encoding="utf-8")
    (data, _), = browser.figures_of(page).values()
    assert max(len(row) for row in data[0]["z"]) <= PATCHING_MAX_COLUMNS
    short = patching_figure(_patching(100, spike=50))
    assert len(short.data[0].z[0]) == 100 and "downsampled" not in short.layout.title.text
