"""Accuracy by context length (`analysis.accuracy`, `report.accuracy`, the `eval` command): the argmax
score against a hand loop, batched greedy decoding against one prompt at a time, upstream's
generation rule on hand-made outputs, the ratio figure, and the CLI end to end."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from diffmamba_interp import accuracy_by_length
from diffmamba_interp.analysis.accuracy import (
    TABLE_COLUMNS, accuracy_ratio, compare_answers, expand_task_lists, generation_correct, greedy_rows,
    preprocess_output, target_in_first_sentence,
)
from diffmamba_interp.analysis.inputs import padded_batches
from diffmamba_interp.cli import app
from diffmamba_interp.config import ARCHS
from diffmamba_interp.data import load_data
from diffmamba_interp.data.babilong import Prompt
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.report.accuracy import accuracy_heatmap_figure, accuracy_ratio_figure, write_accuracy_report

runner = CliRunner()
LOCATIONS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """qa1 at 0 and 500 tokens (bAbI filler: every word in the bAbI tokenizer's vocabulary), 4 questions each."""
    return load_data("babilong:qa1:0k,500", n=4, seed=3, tokenizer=tokenizer, filler="babi")


def babi_model(tiny_model, tokenizer, arch="mamba2", seed=0):
    model = tiny_model(arch, seed=seed, vocab_size=len(tokenizer), shared=True)
    model.tokenizer = tokenizer
    return model


# -- the argmax score --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mamba2", "diffmamba2"])
def test_argmax_accuracy_equals_a_hand_loop(tiny_model, tokenizer, prompts, arch):
    model = babi_model(tiny_model, tokenizer, arch)
    res = accuracy_by_length(model, prompts, batch_size=3, max_new_tokens=0, progress=False)
    hand = []
    with torch.no_grad():
        for p in prompts:  # one prompt at a time, the whole forward, its last position
            logits = model(model.to_tokens(p.prompt))[0, -1]
            target = tokenizer.encode(" " + p.answer, add_special_tokens=False)[0]
            hand.append(int(logits.argmax()) == target)
    assert res.per_example["correct_argmax"].tolist() == hand
    assert list(res.table.columns) == list(TABLE_COLUMNS)
    for (length,), g in pd.DataFrame({"length": [p.meta["length"] for p in prompts], "ok": hand}).groupby(["length"]):
        row = res.table[res.table["length"] == length].iloc[0]
        assert row["n"] == len(g) == 4 and row["accuracy_argmax"] == pytest.approx(g["ok"].mean())
        assert row["argmax_ci_low"] <= row["accuracy_argmax"] <= row["argmax_ci_high"]
    assert res.table["accuracy_generate"].isna().all()  # max_new_tokens=0: argmax only


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tiny_model, tokenizer, prompts, arch):
    """Right-padded batches of different lengths, prefilled in chunks of 7 tokens cut at each row's end:
    token for token the same as `model.generate` on each prompt alone."""
    model = babi_model(tiny_model, tokenizer, arch)
    seqs = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in prompts]
    assert len({len(s) for s in seqs}) > 3
    for idx, ids, last in padded_batches(seqs, 5):
        first, new = greedy_rows(model, ids, [k + 1 for k in last], max_new_tokens=4, chunk_size=7)
        for i, f, gen in zip(idx, first.tolist(), new):
            alone = model.generate(torch.tensor([seqs[i]]), 4)[0, len(seqs[i]):].tolist()
            assert gen == alone and f == alone[0]


def test_generation_scores_follow_upstream_on_the_model_outputs(tiny_model, tokenizer, prompts):
    model = babi_model(tiny_model, tokenizer, "diffmamba2")
    res = accuracy_by_length([model], prompts, labels=["d"], progress=False)
    pe = res.per_example
    assert pe["correct_generate"].tolist() == [generation_correct(p, o) for p, o in zip(prompts, pe["output"])]
    for p, out in zip(prompts, pe["output"]):  # the output is what greedy decoding wrote, stopped at its first sentence
        ids = model.generate(model.to_tokens(p.prompt), 20)[0, len(tokenizer.encode(p.prompt)):].tolist()
        full = tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert full.startswith(out)
    assert res.table["accuracy_generate"].notna().all()


# -- upstream's rule on hand-made outputs ---------------------------------------------------------------
@pytest.mark.parametrize("target, output, question, expected", [
    ("kitchen", "kitchen", "Where is Mary?", True),
    ("kitchen", "Mary is in the kitchen. Then the garden.", "Where is Mary?", True),  # inside the first sentence
    ("garden", "Mary is in the kitchen. Then the garden.", "Where is Mary?", False),  # only in the second sentence
    ("kitchen", "The KITCHEN", "Where is Mary?", True),  # different case
    ("Kitchen", "kitchen.", "Where is Mary?", True),
    ("kitchen", "kitchen or garden", "Where is Mary?", False),  # two labels: not the only prediction
    ("garden", "kitchen garden", "Where was the apple before the kitchen?", True),  # labels in the question do not count
    ("kitchen", "", "Where is Mary?", False),
    ("kitchen", "<context> kitchen", "Where is Mary?", False),  # cut at <context>
])
def test_upstream_compare_answers_by_hand(target, output, question, expected):
    assert compare_answers(target, output, question, LOCATIONS) is expected


def test_upstream_rules_by_hand():
    labels = ["apple", "football", "milk", "nothing"]
    assert compare_answers("apple,football", "football and apple", "What is Mary carrying?", labels)
    assert not compare_answers("apple,football", "apple", "What is Mary carrying?", labels)
    assert not compare_answers("apple,football", "apple, football, milk", "What is Mary carrying?", labels)
    assert preprocess_output("Kitchen. Garden") == "kitchen"
    # the simpler rule (babilong_utils.compare_answers): the target anywhere in the first sentence
    assert target_in_first_sentence("kitchen", "Mary is in the KITCHEN. garden")
    assert not target_in_first_sentence("garden", "Mary is in the kitchen. garden")
    assert target_in_first_sentence("Kitchen", "the kitchen and the garden")
    # generation_correct: upstream's labels of a task; a task outside them: its candidates; none: the simple rule
    qa1 = Prompt(prompt="... Question: Where is Mary? Answer:", answer="kitchen", candidates=(), task="qa1",
                 meta={"question": "Where is Mary?"})
    assert generation_correct(qa1, "kitchen.") and not generation_correct(qa1, "kitchen garden")
    other = Prompt(prompt="Question: What colour? Answer:", answer="red", candidates=("blue",), task="jsonl")
    assert generation_correct(other, "red") and not generation_correct(other, "red blue")
    bare = Prompt(prompt="Question: What colour? Answer:", answer="red", candidates=(), task="jsonl")
    assert generation_correct(bare, "red blue") and not generation_correct(bare, "blue. red")


def test_task_lists_expand():
    assert expand_task_lists("babilong:qa1,qa2:0k,1k") == ["babilong:qa1:0k,1k", "babilong:qa2:0k,1k"]
    assert expand_task_lists("babi:qa1,qa3") == ["babi:qa1", "babi:qa3"]
    assert expand_task_lists("babilong:qa1:0k,1k") == ["babilong:qa1:0k,1k"]
    with pytest.raises(DiffMambaError, match="empty task"):
        expand_task_lists("babilong:qa1,:0k")


# -- the ratio and the figures ----------------------------------------------------------------------
def _table() -> pd.DataFrame:
    rows = []
    acc = {"a": {("qa1", 0): 0.8, ("qa1", 1024): 0.4, ("qa2", 0): 0.5, ("qa2", 1024): 0.0},
           "b": {("qa1", 0): 0.9, ("qa1", 1024): 0.6, ("qa2", 0): 0.25, ("qa2", 1024): 0.1}}
    for model, cells in acc.items():
        for (task, length), v in cells.items():
            rows.append({"model": model, "task": task, "length": length, "n": 20, "accuracy_argmax": v,
                         "argmax_ci_low": v, "argmax_ci_high": v, "accuracy_generate": v / 2,
                         "generate_ci_low": 0.0, "generate_ci_high": 1.0})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["length"] = table["length"].astype("Int64")
    return table


def test_ratio_figure_values_are_b_over_a():
    table = _table()
    for scorer in ("argmax", "generate"):
        ratio = accuracy_ratio(table, "a", "b", scorer)
        fig = accuracy_ratio_figure(table, "a", "b", scorer)
        assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
        trace = fig.data[0]
        assert list(trace.y) == ["qa1", "qa2"] and list(trace.x) == ["0k", "1k"]
        got = np.asarray(trace.customdata, dtype=float)[..., 0]
        a = table[table.model == "a"].set_index(["task", "length"])[f"accuracy_{scorer}"]
        b = table[table.model == "b"].set_index(["task", "length"])[f"accuracy_{scorer}"]
        for i, task in enumerate(["qa1", "qa2"]):
            for j, length in enumerate([0, 1024]):
                want = b[(task, length)] / a[(task, length)] if a[(task, length)] > 0 else np.nan
                np.testing.assert_allclose(got[i, j], want, equal_nan=True)
                np.testing.assert_allclose(ratio.set_index(["task", "length"]).loc[(task, length), "ratio"], want,
                                           equal_nan=True)
        assert np.isnan(got[1, 1]) and trace.text[1][1] == "–"  # a gets none right: undefined, not a number
        np.testing.assert_allclose(np.asarray(trace.z, dtype=float)[0, 0], np.log2(0.9 / 0.8 if scorer == "argmax" else 0.45 / 0.4))


def test_heatmap_figure_one_panel_per_model():
    table = _table()
    fig = accuracy_heatmap_figure(table, "argmax")
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and [t.name for t in fig.data] == ["a", "b"]
    np.testing.assert_allclose(np.asarray(fig.data[1].z, dtype=float), [[0.9, 0.6], [0.25, 0.1]])
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    with pytest.raises(DiffMambaError, match="unknown scorer"):
        accuracy_heatmap_figure(table, "beam")
    with pytest.raises(DiffMambaError, match="missing required column"):
        write_accuracy_report("unused.html", table.drop(columns="accuracy_generate"))


# -- the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tiny_pair_checkpoints):
    return tiny_pair_checkpoints


def _array(value) -> np.ndarray:
    """A trace's array as the page stores it: a list, or plotly's base64 form {"dtype", "bdata", "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        import base64

        shape = [int(k) for k in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape).astype(float)
    return np.array([[np.nan if v is None else v for v in row] for row in value], dtype=float)


def _figures(page: str) -> dict:
    """Every Plotly.newPlot call of a page: div id -> its traces."""
    out, dec = {}, json.JSONDecoder()
    for m in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', page):
        out[m.group(1)], _ = dec.raw_decode(page, m.end())
    return out


def test_eval_command_end_to_end(ckpts, tmp_path):
    html, csv, js = tmp_path / "out" / "eval.html", tmp_path / "eval.csv", tmp_path / "eval.json"
    code, out, err = run("eval", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--data", "babilong:qa1,qa2:0k,500",
                         "-n", 2, "--filler", "babi", "--max-new-tokens", 3, "--out", html, "--csv", csv,
                         "--json", js, "-q")
    assert code == 0, err
    assert "accuracy_argmax" in out and "accuracy_generate" in out and "ratio" in out
    assert "warning" not in err  # bAbI filler: every word is in the vocabulary
    table = pd.read_csv(csv)
    assert list(table.columns) == list(TABLE_COLUMNS) and len(table) == 2 * 2 * 2
    assert set(table["length"]) == {0, 500} and (table["n"] == 2).all()
    doc = json.loads(js.read_text())
    assert doc["data"]["specs"] == ["babilong:qa1:0k,500", "babilong:qa2:0k,500"] and len(doc["examples"]) == 16
    assert {r["scorer"] for r in doc["ratio"]} == {"argmax", "generate"}
    page = html.read_text(encoding="utf-8")
    assert page.count(get_plotlyjs()[:400]) == 1 and page.count("* plotly.js v") == 1  # plotly.js embedded once
    figures = _figures(page)
    assert sorted(figures) == ["fig-accuracy-argmax", "fig-accuracy-generate", "fig-ratio-argmax-diffmamba2-tiny",
                               "fig-ratio-generate-diffmamba2-tiny"]
    for name in ("fig-accuracy-argmax", "fig-accuracy-generate"):
        assert [(t["type"], t["name"]) for t in figures[name]] == [("heatmap", "mamba2-tiny"), ("heatmap", "diffmamba2-tiny")]
        assert figures[name][0]["y"] == ["qa1", "qa2"] and figures[name][0]["x"] == ["0k", "500"]
    ratio = figures["fig-ratio-argmax-diffmamba2-tiny"]
    assert len(ratio) == 1 and ratio[0]["type"] == "heatmap" and ratio[0]["name"] == "diffmamba2-tiny / mamba2-tiny"
    a = table[table.model == "mamba2-tiny"]["accuracy_argmax"].to_numpy()
    b = table[table.model == "diffmamba2-tiny"]["accuracy_argmax"].to_numpy()
    got = _array(ratio[0]["customdata"])[..., 0]
    np.testing.assert_allclose(got.ravel(), np.where(a > 0, b / np.where(a > 0, a, 1), np.nan), equal_nan=True)


def test_eval_refuses_bad_input_in_one_line(ckpts, tmp_path, monkeypatch):
    import diffmamba_interp.jobs as jobs

    code, _, err = run("eval", "--ckpt", tmp_path / "nope", "--data", "babilong:qa1:0k", "-n", 1, "-q")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nope" in err
    monkeypatch.setattr(jobs, "load_models", lambda ckpts: pytest.fail("loaded models before checking the input"))
    for args, needle in [(["--data", "babilong:qa1:huge"], "bad BABILong length"),
                         (["--data", "babilong:qa1:0k", "--data", "nonsense"], "unknown data spec"),
                         (["--data", "babilong:qa1:0k", "-n", 0], "--n must be"),
                         (["--data", "babilong:qa1:0k", "--batch-size", 0], "--batch-size must be"),
                         (["--data", "babilong:qa1:0k", "--max-new-tokens", -1], "--max-new-tokens must be"),
                         (["--data", "babilong:qa1:0k", "--csv", tmp_path / "t.json"], "give a file ending in .csv")]:
        code, _, err = run("eval", "--ckpt", ckpts[0], *args, "-q")
        assert code == 2 and err.count("\n") == 1 and needle in err, (args, err)


def test_eval_refuses_an_answer_outside_the_vocabulary_before_any_model_runs(ckpts, tmp_path, monkeypatch):
    from diffmamba_interp.analysis import accuracy

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Mary went to the kitchen .", "answer": "kitchenette"}) + "\n")
    monkeypatch.setattr(accuracy, "score_examples", lambda *a, **k: pytest.fail("ran a model before the guard"))
    code, _, err = run("eval", "--ckpt", ckpts[0], "--data", f"jsonl:{data}", "-n", 1, "-q")
    assert code == 2 and err.count("\n") == 1 and "'kitchenette' is not in the tokenizer's vocabulary" in err


def test_on_the_shipped_models_argmax_agrees_with_the_snr_accuracy():
    """`eval`'s argmax score and the SNR run's task accuracy (rank 1 at the final layer) are one rule."""
    from diffmamba_interp import jobs

    try:
        jobs.default_checkpoints()
    except DiffMambaError:
        pytest.skip("shipped models not trained")
    models = jobs.load_models(None)
    run = jobs.run_eval(data="babi:qa1", n=12, max_new_tokens=2, models=models, progress=False)
    snr = jobs.run_snr(data="babi:qa1", n=12, lens="logit", models=models, progress=False, n_boot=10)
    want = snr.accuracy_table().set_index("model")["accuracy"]
    got = run.table.set_index("model")["accuracy_argmax"]
    assert run.result.labels == [m.label for m in models] and (run.table["n"] == 12).all()
    for label in run.result.labels:
        assert got[label] == pytest.approx(want[label])
    assert run.table["accuracy_generate"].between(0, 1).all()
