"""The `diffmamba-interp` commands on tiny checkpoints built here (and the console script itself)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import perturb_
from diffmamba_interp import HookedMamba, MambaConfig
from diffmamba_interp.analysis.lens import TunedLens
from diffmamba_interp.cli import app
from diffmamba_interp.data import build_babi_tokenizer

runner = CliRunner()
PROMPT = "<context> \nMary went to the kitchen. John moved to the garden.\n</context>\n\nQuestion: Where is Mary? Answer:"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny random checkpoints with the bAbI tokenizer and a tuned lens: Mamba-2, Diff-Mamba-2."""
    tok = build_babi_tokenizer()
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for k, arch in enumerate(["mamba2", "diffmamba2"]):
        torch.manual_seed(k)
        model = perturb_(HookedMamba(MambaConfig(arch=arch, d_model=32, n_layers=2, vocab_size=len(tok), d_state=8, head_dim=16)))
        model.tokenizer = tok
        path = root / f"{arch}-tiny"
        model.save_pretrained(path)
        TunedLens(model).save(path)
        paths.append(str(path))
    return paths


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_help_and_version():
    code, out, _ = run("--help")
    assert code == 0
    for cmd in ("snr", "lens", "attention", "compare", "report", "hooks", "train"):
        assert cmd in out
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("diffmamba-interp ")


def test_snr_json_schema_and_report(ckpts, tmp_path):
    out_json, out_html = tmp_path / "snr.json", tmp_path / "snr.html"
    code, out, err = run("snr", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--data", "babi:qa1", "--n", 6,
                         "--json", out_json, "--out", out_html, "-q")
    assert code == 0, err
    assert "prob_mean" in out and "paired difference" in out
    doc = json.loads(out_json.read_text())
    # the default lens is "auto": the tuned lens each checkpoint has (an identity one here)
    assert doc["lens"] == "auto" and doc["n_examples"] == 6 and doc["data"]["spec"] == "babi:qa1"
    assert doc["schema_version"] == 2 and [m["lens"] for m in doc["models"]] == ["tuned", "tuned"]
    assert [m["arch"] for m in doc["models"]] == ["mamba2", "diffmamba2"]
    for m in doc["models"]:
        assert m["n_layers"] == 2 and len(m["layers"]) == 3  # layer 0 = embeddings
        assert [r["layer"] for r in m["layers"]] == [0, 1, 2]
        for r in m["layers"]:
            assert set(r) >= {"layer", "prob_mean", "prob_ci_low", "prob_ci_high", "prob_median", "snr_db_mean",
                              "rank_mean", "distractor_ratio_mean"}
            assert r["prob_ci_low"] <= r["prob_mean"] <= r["prob_ci_high"]
            assert r["paper_layer"] == (None if r["layer"] == 0 else r["layer"] - 1)
            for measure in ("snr_db", "rank", "distractor_log_ratio"):  # an interval for every measure
                assert {f"{measure}_ci_low", f"{measure}_ci_high", f"{measure}_median"} <= set(r)
    assert {p["measure"] for p in doc["paired"]} >= {"prob", "snr_db"}
    html = out_html.read_text()
    assert "Needle probability" in html and html.count("plotly.js v") <= 2
    assert "tuned lens, babi:qa1, n = 6" in html  # the title names the lens and the data


def test_snr_tuned_lens(ckpts, tmp_path):
    code, out, err = run("snr", "--ckpt", ckpts[1], "--n", 3, "--lens", "tuned", "--json", tmp_path / "t.json", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "t.json").read_text())["lens"] == "tuned"


def test_lens_command(ckpts):
    code, out, err = run("lens", "--ckpt", ckpts[1], "--prompt", PROMPT, "--answer", "kitchen", "--top", 3)
    assert code == 0, err
    assert "kitchen" in out and "top_tokens" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 ", "2 "))]) == 3


def test_attention_command(ckpts, tmp_path):
    out_html = tmp_path / "att.html"
    code, out, err = run("attention", "--ckpt", ckpts[1], "--prompt", PROMPT, "--layer", 0, "--out", out_html)
    assert code == 0, err
    assert "branch 1, branch 2, differential" in out
    assert out_html.exists()
    code, out, err = run("attention", "--ckpt", ckpts[1], "--prompt", PROMPT, "--layer", 1, "--kind", "block", "--out", out_html)
    assert code == 0, err
    assert "maps layer" in out


def test_compare_command(ckpts):
    code, out, err = run("compare", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--n", 4, "--measure", "snr_db", "-q")
    assert code == 0, err
    assert "mamba2-tiny" in out and "diffmamba2-tiny" in out and "paired difference of snr_db" in out


def test_hooks_command(ckpts):
    code, out, err = run("hooks", "--ckpt", ckpts[1], "--pos", 3)
    assert code == 0, err
    assert "blocks.0.hook_diff" in out and "[1, 3, 32]" in out and "blocks.0.mixer_2.hook_ssm_state" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["snr", "--ckpt", "/no/such/dir", "-q"], "/no/such/dir: no such directory"),
        (["snr", "--data", "babi:qa99", "-q"], "qa99"),
        (["snr", "--data", "bogus:qa1", "-q"], "bogus"),
        (["snr", "--n", "0", "-q"], "--n must be a positive"),
        (["attention", "--prompt", PROMPT, "--layer", "7"], "layer 7 is out of range"),
        (["attention", "--prompt", PROMPT, "--layer", "1", "--branch", "1"], "not differential"),
        (["lens", "--prompt", PROMPT, "--answer", ""], "answer '' is 0 tokens"),
        (["lens", "--prompt", PROMPT, "--answer", "hallway kitchen"], "answer 'hallway kitchen' is 2 tokens"),
    ],
)
def test_bad_input_is_one_line(ckpts, args, needle):
    # point the model-taking commands at the tiny checkpoints (the shipped ones may not exist yet)
    if "--ckpt" not in args:
        args = args[:1] + ["--ckpt", ckpts[0], "--ckpt", ckpts[1]] + args[1:] if args[0] in ("snr",) else args[:1] + ["--ckpt", ckpts[1]] + args[1:]
    code, out, err = run(*args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err + out


def test_malformed_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, out, err = run("hooks", "--ckpt", tmp_path)
    assert code == 2 and err.startswith("error: ") and "config.json" in err and "Traceback" not in err


def test_console_script_runs_as_a_process(ckpts):
    proc = subprocess.run([sys.executable, "-m", "diffmamba_interp.cli", "--help"], capture_output=True, text=True, timeout=120)
    script = str(Path(sys.executable).parent / "diffmamba-interp")
    exe = subprocess.run([script, "hooks", "--ckpt", "/nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "snr" in proc.stdout
    assert exe.returncode == 2 and exe.stderr.startswith("error: ") and "Traceback" not in exe.stderr


def test_train_a_few_steps(tmp_path):
    out = tmp_path / "m"
    code, stdout, err = run("train", "--arch", "diffmamba2", "--out", out, "--steps", 3, "--d-model", 16, "--eval-n", 20,
                            "--n-layers", 2, "--d-state", 8, "--lens-steps", 2, "-q")
    assert code == 0, err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tuned_lens.safetensors", "README.md", "training.json"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "seed: 0; steps: 3" in card and "| qa1 | 0k | 20 |" in card and "| qa1 | 1024 tokens | 20 |" in card
    assert "## Tuned lens" in card and "Belrose" in card
    from diffmamba_interp import load_model

    model = load_model(out)
    assert model.cfg.arch == "diffmamba2" and model.cfg.d_state == 8 and model.tokenizer is not None
    training = json.loads((out / "training.json").read_text())
    assert [(r["task"], r["length"]) for r in training["accuracy"]] == [
        ("qa1", 0), ("qa2", 0), ("qa3", 0), ("qa4", 0), ("qa5", 0), ("qa1", 1024)]


def test_snr_paper_preset(ckpts, tmp_path):
    from diffmamba_interp.data import available_tasks

    tok = build_babi_tokenizer(tasks=tuple(available_tasks()))  # the paper's protocol spans qa1-qa20
    paths = []
    for k, arch in enumerate(["mamba2", "diffmamba2"]):
        torch.manual_seed(k)
        model = perturb_(HookedMamba(MambaConfig(arch=arch, d_model=32, n_layers=2, vocab_size=len(tok), d_state=8, head_dim=16)))
        model.tokenizer = tok
        model.save_pretrained(tmp_path / arch)
        TunedLens(model).save(tmp_path / arch)
        paths.append(str(tmp_path / arch))
    out_json = tmp_path / "paper.json"
    code, out, err = run("snr", "--ckpt", paths[0], "--ckpt", paths[1], "--preset", "paper", "--n", 8, "--json", out_json, "-q")
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["data"]["spec"] == "paper" and doc["data"]["preset"] == "paper" and doc["lens"] == "tuned"
    assert doc["n_examples"] == 8 and "paper protocol" in out
    from diffmamba_interp.data import load_data

    first = load_data("paper", n=8)
    assert len({p.task for p in first}) > 1  # shuffled across the 20 tasks, not the head of qa1
    for args, needle in ((["--data", "babi:qa1"], "fixes --data paper"), (["--lens", "logit"], "fixes --lens tuned")):
        code, _, err = run("snr", "--ckpt", paths[0], "--preset", "paper", *args, "-q")
        assert code == 2 and needle in err and err.count("\n") == 1
    # a tokenizer that cannot spell every answer (the shipped qa1-qa5 one) is refused, not read as <unk>
    code, _, err = run("snr", "--ckpt", ckpts[0], "--preset", "paper", "--n", 40, "-q")
    assert code == 2 and "not in the tokenizer's vocabulary" in err


def test_chunk_size_option(ckpts, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, chunk in ((a, 5), (b, 4096)):
        code, _, err = run("snr", "--ckpt", ckpts[1], "--n", 3, "--lens", "logit", "--chunk-size", chunk, "--json", path, "-q")
        assert code == 0, err
    rows = lambda p: json.loads(p.read_text())["models"][0]["layers"]  # noqa: E731
    for x, y in zip(rows(a), rows(b)):
        assert abs(x["prob_mean"] - y["prob_mean"]) < 1e-5
    code, _, err = run("snr", "--ckpt", ckpts[1], "--n", 3, "--chunk-size", 0, "-q")
    assert code == 2 and "chunk_size must be a positive" in err


def test_snr_per_example_csv_and_parquet(ckpts, tmp_path):
    import pandas as pd

    for name, read in (("pe.csv", pd.read_csv), ("pe.parquet", pd.read_parquet)):
        path = tmp_path / "sub" / name
        code, _, err = run("snr", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--n", 4, "--per-example", path, "-q")
        assert code == 0, err
        df = read(path)
        assert len(df) == 2 * 4 * 3  # models × examples × layers (0 = embeddings, 1, 2)
        assert set(df["model"]) == {"mamba2-tiny", "diffmamba2-tiny"} and set(df["layer"]) == {0, 1, 2}
        for column in ("example", "story", "task", "answer", "paper_layer", "prob", "logprob", "rank", "snr_db",
                       "distractor_ratio", "distractor_log_ratio"):
            assert column in df.columns
        assert not df.duplicated(["model", "example", "layer"]).any()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["pe.csv", "pe.parquet"]  # no temp files left


def test_report_per_example_and_the_few_stories_warning(ckpts, tmp_path):
    import pandas as pd

    out_html, out_csv = tmp_path / "r.html", tmp_path / "r.csv"
    code, _, err = run("report", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--n", 3, "--out", out_html,
                       "--per-example", out_csv, "-q")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "only 3 stories" in warnings[0] and "fewer than 10" in warnings[0]
    assert 'class="dm-warning"' in out_html.read_text()
    assert len(pd.read_csv(out_csv)) == 2 * 3 * 3


def test_enough_stories_give_no_warning(ckpts):
    code, _, err = run("compare", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--n", 12, "-q")
    assert code == 0 and "warning:" not in err, err


@pytest.mark.parametrize("name, needle", [("pe.json", "give a file ending in .csv or .parquet"),
                                          ("missing-dir-is-a-file/pe.csv", "cannot be created")])
def test_per_example_path_is_checked_before_any_work(ckpts, tmp_path, name, needle, monkeypatch):
    import diffmamba_interp.jobs as jobs

    (tmp_path / "missing-dir-is-a-file").write_text("x")
    monkeypatch.setattr(jobs, "run_snr", lambda *a, **k: pytest.fail("ran before checking --per-example"))
    code, _, err = run("snr", "--ckpt", ckpts[0], "--per-example", tmp_path / name, "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --per-example") and needle in err


def test_parquet_without_pyarrow_is_a_clear_error(ckpts, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    code, _, err = run("report", "--ckpt", ckpts[0], "--per-example", tmp_path / "pe.parquet", "-q")
    assert code == 2 and "Parquet needs pyarrow" in err and "or write .csv" in err


def test_seed_groups_write_per_example_and_warn(ckpts, tmp_path):
    import pandas as pd

    path = tmp_path / "seeds.csv"
    code, _, err = run("snr", "--ckpt-a", ckpts[0], "--ckpt-b", ckpts[1], "--n", 4, "--lens", "logit",
                       "--per-example", path, "-q")
    assert code == 0, err
    assert sum(line.startswith("warning: only") for line in err.splitlines()) == 1
    df = pd.read_csv(path)
    assert {"group", "model", "example", "layer", "prob"} <= set(df.columns) and len(df) == 2 * 4 * 3
