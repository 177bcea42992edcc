"""torchrun with 2 CPU processes (gloo): the work is sharded, the rows gathered, and the output is the
single-process output (snr and eval to float32 rounding: the batches differ; patch exactly: each cell
runs as in one process); only rank 0 writes and prints. Also two ranks played in one process (the
gathers faked), for every kind of patching grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CLEAN = "Mary went to the kitchen . John moved to the garden . Where is Mary ?"
CORRUPT = "Mary went to the garden . John moved to the kitchen . Where is Mary ?"

pytestmark = pytest.mark.slow


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


def test_torchrun_two_processes_write_what_one_process_writes(tmp_path):
    args = ["snr", "--n", "12", "--json"]
    one = subprocess.run([sys.executable, "-m", "diffmamba_interp", *args, str(tmp_path / "one.json"), "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    # `--` ends torchrun's own options (its argparse would read our --n as an abbreviation of --nnodes)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "diffmamba_interp", "--", *args, str(tmp_path / "two.json"), "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    _close(json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text()))
    assert two.stdout.count("paired difference of prob") == 1  # the tables once, from rank 0
    assert two.stderr.count("wrote ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"]  # no temporary files left


def test_shards_cover_every_example_once(monkeypatch):
    from diffmamba_interp import distributed

    assert distributed.shard(5) == [0, 1, 2, 3, 4] and distributed.gather("x") == ["x"] and distributed.is_main()
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        parts.append(distributed.shard(8))
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert not distributed.is_main()
    # by size: dealt in order of size (the long ones shared out as the short ones), each share ascending
    parts = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        parts.append(distributed.shard(5, sizes=[50, 10, 40, 20, 30]))
    assert parts == [[0, 1, 4], [2, 3]]


def test_gathered_rows_land_where_one_process_puts_them(monkeypatch):
    from diffmamba_interp import distributed

    a, b, c = np.zeros((4, 2)), ["p", "", "q", ""], {0: 1, 2: 3}  # rank 0's rows at items 0 and 2
    distributed.gather_rows([0, 2], a, b, c)  # one process: nothing to do (torch.distributed untouched)
    assert not a.any() and b == ["p", "", "q", ""] and c == {0: 1, 2: 3}
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather", lambda obj: [obj, ([3, 1], [np.ones((2, 2)), ["x", "y"], [5, 6]])])
    distributed.gather_rows([0, 2], a, b, c)
    assert a[:, 0].tolist() == [0, 1, 0, 1] and b == ["p", "y", "q", "x"] and c == {0: 1, 1: 6, 2: 3, 3: 5}


# -- two ranks in one process ----------------------------------------------------------------------
class _Sent(Exception):
    """Rank 1 has sent its rows: the rest of its run is not needed."""


def _as_rank_0_of_2(monkeypatch, run):
    """run() as rank 1 of a world of 2 up to its gather, then as rank 0, whose gather receives what rank 1
    sent -> (rank 0's result, what rank 1 sent)."""
    from diffmamba_interp import distributed

    sent = []

    def send(obj):
        sent.append(obj)
        raise _Sent

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "gather", send)
    with pytest.raises(_Sent):
        run()
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather", lambda obj: [obj, sent[0]])
    return run(), sent[0]


@pytest.mark.parametrize("what", ["resid", "branch", "state"])
def test_two_ranks_patch_the_single_process_grid(tiny_model, monkeypatch, what):
    from diffmamba_interp.analysis.patching import logit_diff, patch

    model = tiny_model("diffmamba2", diff_layers="all", n_layers=3, shared=True)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, 40, (1, 9), generator=g), torch.randint(0, 40, (1, 9), generator=g)

    def run():
        return patch(model, clean, corrupt, logit_diff(3, 4), what=what, batch_size=2, chunk_size=4, progress=False).frame

    one = run()
    two, sent = _as_rank_0_of_2(monkeypatch, run)
    pd.testing.assert_frame_equal(two, one, check_exact=True)  # each cell run as one process runs it
    keys, _ = sent
    assert 0 < len(keys) < len(one)  # rank 1 ran a share of the cells


def test_two_ranks_score_the_single_process_examples(tiny_model, tokenizer, monkeypatch):
    from diffmamba_interp.analysis.accuracy import score_examples
    from diffmamba_interp.data import load_data

    model = tiny_model("mamba2", vocab_size=len(tokenizer), shared=True)
    model.tokenizer = tokenizer
    prompts = load_data("babilong:qa1:0k,500", n=3, seed=3, tokenizer=tokenizer, filler="babi")

    def run():
        return score_examples(model, prompts, batch_size=2, max_new_tokens=3, progress=False)

    one = run()
    two, sent = _as_rank_0_of_2(monkeypatch, run)
    pd.testing.assert_frame_equal(two, one)
    mine, _ = sent
    lengths = sorted(set(one["length"].iloc[mine]))
    assert len(mine) == 3 and lengths == [0, 500]  # half of the prompts, long and short alike


# -- torchrun -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tiny_pair_checkpoints):
    """--ckpt options for a saved tiny mamba2 and diffmamba2."""
    return [arg for path in tiny_pair_checkpoints for arg in ("--ckpt", path)]


def _one_and_two(args: list, folder: Path, **files: str):
    """The command run by one process and by torchrun with 2 processes, one torch thread each, each
    writing the files `files` (option name without -- -> file name) with a prefix one- or two- -> the
    two CompletedProcesses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for tag, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])):
        named = [a for option, name in files.items() for a in (f"--{option}", str(folder / f"{tag}-{name}"))]
        cmd = [sys.executable, *launch, "-m", "diffmamba_interp", *(["--"] if launch else []), *args, *named, "-q"]
        runs.append(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env))
        assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
    return runs


def test_torchrun_patch_writes_what_one_process_writes(ckpts, tmp_path):
    one, two = _one_and_two(["patch", *ckpts, "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "kitchen",
                             "--wrong", "garden", "--batch-size", "3"], tmp_path, csv="p.csv", out="p.html")
    assert (tmp_path / "two-p.csv").read_text() == (tmp_path / "one-p.csv").read_text()  # every cell, exactly
    assert two.stdout == one.stdout and two.stdout.count("the 10 largest effects") == 2  # the tables once, rank 0
    assert two.stderr.count("wrote ") == one.stderr.count("wrote ") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-p.csv", "one-p.html", "two-p.csv", "two-p.html"]


def test_torchrun_eval_writes_what_one_process_writes(ckpts, tmp_path):
    one, two = _one_and_two(["eval", *ckpts, "--data", "babilong:qa1:0k,500", "-n", "3", "--filler", "babi",
                             "--max-new-tokens", "3"], tmp_path, json="e.json")
    doc = json.loads((tmp_path / "one-e.json").read_text())
    assert len(doc["examples"]) == 2 * 2 * 3
    _close(doc, json.loads((tmp_path / "two-e.json").read_text()))  # every example's output, in order
    assert two.stdout == one.stdout and two.stdout.count("accuracy ratio to") == 1  # the tables once, rank 0
    assert two.stderr.count("wrote ") == one.stderr.count("wrote ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-e.json", "two-e.json"]
