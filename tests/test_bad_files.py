"""Bad input, category "files" (issue 17): outputs are written through a temporary file and a rename
with the umask's mode (a failed write leaves the old file and no temporary file), `--debug` works
after the subcommand too, and a closed stdout pipe ends the command quietly."""

import json
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from diffmamba_interp.cli import app
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.files import write_atomic

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_save_pretrained_files_get_the_umask_mode(tiny_model, tokenizer, tmp_path, umask, mask):
    umask(mask)
    model = tiny_model("mamba2", vocab_size=len(tokenizer), shared=True)
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "m")
    files = sorted(p for p in (tmp_path / "m").iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in files}
    for p in files:
        assert mode(p) == 0o666 & ~mask, (p.name, oct(mode(p)))
    assert not [p for p in files if p.name.startswith(".")]  # no temporary file or staging directory left


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiffMambaError, match=r"out\.json: cannot be written \(No space left on device\)"):
        write_atomic(target, write=half_then_fail)
    assert target.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["out.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["r.html"]


def test_write_atomic_follows_symlinks_and_writes_devices_in_place(tmp_path, umask):
    umask(0o022)
    real = tmp_path / "real.json"
    real.write_text("old")
    os.chmod(real, 0o600)
    link = tmp_path / "link.json"
    os.symlink(real, link)
    write_atomic(link, "new")
    assert os.path.islink(link) and real.read_text() == "new" and mode(real) == 0o644
    write_atomic("/dev/null", "discarded")  # a device: written in place, not replaced
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_json_and_report_outputs_are_atomic_with_umask_mode(ckpt, tmp_path, umask):
    umask(0o027)
    out_json, out_html = tmp_path / "s.json", tmp_path / "s.html"
    out_json.write_text("old")
    result = run("snr", "--ckpt", ckpt, "--n", 2, "--json", out_json, "--out", out_html, "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(out_json.read_text())["n_examples"] == 2
    assert mode(out_json) == 0o640 and mode(out_html) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["s.html", "s.json"]


def test_report_writer_uses_the_atomic_writer(tmp_path, monkeypatch):
    from diffmamba_interp import files
    from diffmamba_interp.report import html, write_report

    calls = []
    real = files.write_atomic
    monkeypatch.setattr(html, "write_atomic", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    path = write_report(tmp_path / "t.html", title="t", tables={"t": pd.DataFrame({"a": [1]})})
    assert calls == [tmp_path / "t.html"] and path.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("where", ["before", "after", "last"])
def test_debug_is_accepted_after_the_subcommand(where):
    args = {"before": ["--debug", "hooks", "--ckpt", "/no/such"], "after": ["hooks", "--debug", "--ckpt", "/no/such"],
            "last": ["hooks", "--ckpt", "/no/such", "--debug"]}[where]
    result = run(*args)
    assert isinstance(result.exception, DiffMambaError) and "no such directory" in str(result.exception)
    result = run("hooks", "--ckpt", "/no/such")  # and without it: one line again
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_broken_pipe_in_process_is_quiet(ckpt, monkeypatch):
    import typer

    from diffmamba_interp import cli

    def closed(*a, **k):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli.typer, "echo", closed)
    result = run("hooks", "--ckpt", ckpt, "--pos", 2)
    assert result.exit_code == 141 and "BrokenPipe" not in result.stderr + result.stdout
    assert typer.echo is closed


def test_broken_pipe_in_a_real_pipe_is_quiet(ckpt):
    proc = subprocess.Popen([sys.executable, "-m", "diffmamba_interp.cli", "hooks", "--ckpt", str(ckpt), "--pos", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -0` would: the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err
