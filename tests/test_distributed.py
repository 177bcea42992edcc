"""torchrun with 2 CPU processes (gloo): the examples are sharded, the rows gathered, and the JSON is
the single-process JSON (to float32 rounding: the batches differ); only rank 0 writes and prints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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
