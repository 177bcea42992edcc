"""Bad input, category "resources" (issue 17): absurd sizes are refused before anything is allocated
(the config is checked against the stored tensor shapes on a meta-device model, and a model larger
than this machine's memory is refused), and `hooks --pos` is bounded."""

import time

import pytest
from typer.testing import CliRunner

from diffmamba_interp import load_model
from diffmamba_interp.cli import app
from diffmamba_interp.errors import DiffMambaError

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.mark.parametrize("fields", [
    {"hidden_size": 1e9, "num_heads": None}, {"vocab_size": 1e12}, {"vocab_size": 10**12, "hidden_size": 10**6, "num_heads": None},
    {"num_hidden_layers": 10**7}, {"state_size": 10**9},
])
def test_absurd_sizes_are_refused_before_allocating(damaged_checkpoint, ckpt, fields):
    bad = damaged_checkpoint(ckpt, "config", fields=fields)
    start = time.perf_counter()
    with pytest.raises(DiffMambaError) as e:
        load_model(bad)
    assert time.perf_counter() - start < 20  # no gigabytes were touched
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and any(
        needle in msg for needle in ("do not match config.json", "weights hold 2 blocks", "sizes too large"))


def test_non_strict_load_of_a_model_too_large_for_memory(damaged_checkpoint, ckpt):
    bad = damaged_checkpoint(ckpt, "config", fields={"vocab_size": 10**12})
    with pytest.raises(DiffMambaError, match=r"config.json: the config describes a model of [\d,]+ parameters .* more than this machine's memory"):
        load_model(bad, strict=False)


def test_hooks_pos_is_bounded(ckpt):
    code, out, err = run("hooks", "--ckpt", ckpt, "--pos", 100_000_000)
    assert code == 2 and err.startswith("error: --pos must be from 1 to") and "Traceback" not in err
    code, out, err = run("hooks", "--ckpt", ckpt, "--pos", 0)
    assert code == 2 and "--pos must be from 1" in err


def test_train_refuses_a_model_too_large_for_memory(tmp_path):
    code, out, err = run("train", "--out", tmp_path / "m", "--d-model", 10**7, "--n-layers", 10**4, "--steps", 1, "-q")
    assert code == 2 and "more than this machine's memory" in err
    assert not (tmp_path / "m").exists()
