"""Bad input, category "data lost" (issue 17): `train --out` never overwrites a model without
--force, replaces every file of the old model when forced (no stale tuned lens next to new weights),
and checks every option before training starts (so a bad option writes nothing)."""

import json

import pytest
from typer.testing import CliRunner

from diffmamba_interp.cli import app
from diffmamba_interp.errors import DiffMambaError

runner = CliRunner()
TINY_TRAIN = ["--arch", "mamba2", "--steps", "1", "--d-model", "16", "--n-layers", "1", "--batch-size", "4",
              "--eval-n", "2", "--lens-steps", "0", "-q"]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def old_model(tiny_model, tokenizer, tmp_path):
    """A directory holding a saved model, its card, training.json and a tuned lens."""
    from diffmamba_interp.analysis.lens import TunedLens

    model = tiny_model("mamba2", vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    out = tmp_path / "old"
    model.save_pretrained(out)
    TunedLens(model).save(out)
    (out / "README.md").write_text("# the old model\n")
    (out / "training.json").write_text('{"old": true}\n')
    (out / "notes.txt").write_text("mine\n")
    return out


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_non_empty_out_is_refused_without_force(old_model):
    before = snapshot(old_model)
    code, out, err = run("train", "--out", old_model, *TINY_TRAIN)
    assert code == 2
    line = one_line(err)
    assert str(old_model) in line and "not empty" in line and "--force" in line
    assert snapshot(old_model) == before


def test_force_replaces_every_file_of_the_old_model(old_model):
    code, out, err = run("train", "--out", old_model, "--force", *TINY_TRAIN)
    assert code == 0, err
    names = {p.name for p in old_model.iterdir()}
    assert not {"tuned_lens.safetensors", "tuned_lens.json"} & names  # --lens-steps 0: the old lens is gone
    assert {"config.json", "model.safetensors", "README.md", "training.json", "tokenizer.json"} <= names
    assert "notes.txt" in names  # not part of a model: kept
    assert json.loads((old_model / "training.json").read_text())["steps"] == 1
    assert "the old model" not in (old_model / "README.md").read_text()
    assert not [p for p in old_model.parent.iterdir() if ".staging-" in p.name]  # no staging directory left


def test_empty_or_new_out_needs_no_force(tmp_path):
    (tmp_path / "empty").mkdir()
    from diffmamba_interp.train import check_output_dir

    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiffMambaError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file", force=True)


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--lens-steps", "-1"], "--lens-steps must be a whole number >= 0"),
    (["--steps", "0"], "--steps must be a whole number >= 1"),
    (["--steps", "-3"], "--steps must be"),
    (["--d-model", "0"], "--d-model must be"),
    (["--n-layers", "0"], "--n-layers must be"),
    (["--d-state", "0"], "--d-state must be"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--lr", "-1"], "--lr must be"),
    (["--eval-n", "0"], "--eval-n must be a positive"),
    (["--eval-n", "5000"], "--eval-n 5000 is more than the 1000 test questions"),
    (["--seed", "-5"], "--seed must be"),
    (["--d-model", "12"], "head_dim"),  # sizes the architecture cannot build
    (["--init", "/no/such/ckpt"], "/no/such/ckpt: no such directory"),
    (["--tasks", "qa1,qa9"], "--tasks must be a non-empty selection of qa1, qa2, qa3, qa4, qa5"),
])
def test_every_option_is_checked_before_training(tmp_path, args, needle):
    out = tmp_path / "m"
    base = [a for a in TINY_TRAIN]
    for flag in args[::2]:
        if flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    code, _, err = run("train", "--out", out, *base, *args)
    assert code == 2
    assert needle in one_line(err)
    assert not out.exists()  # nothing written, nothing trained


def test_init_with_another_config_is_refused_before_training(old_model, tmp_path):
    code, _, err = run("train", "--out", tmp_path / "m", "--init", old_model, *TINY_TRAIN)
    assert code == 2 and "its config differs" in one_line(err)
    assert not (tmp_path / "m").exists()


def test_train_config_check_api():
    from diffmamba_interp.train import TrainConfig

    for kw, needle in [(dict(batch_size=0), "--batch-size"), (dict(warmup=0), "--warmup"),
                       (dict(weight_decay=-1.0), "--weight-decay"), (dict(tasks=("qa9",)), "tasks"),
                       (dict(arch="nope"), "unknown arch")]:
        with pytest.raises(DiffMambaError, match=needle):
            TrainConfig(**kw).check()
