"""--device / --dtype on every command (issue 12): checked before any work, accepted before or after
the subcommand, handed to the models the commands load."""

import pytest
import torch
from typer.testing import CliRunner

from diffmamba_interp import jobs
from diffmamba_interp.cli import _hoist_globals, app


@pytest.fixture(autouse=True)
def _runtime(monkeypatch):
    monkeypatch.setitem(jobs.RUNTIME, "device", None)
    monkeypatch.setitem(jobs.RUNTIME, "dtype", None)


def test_global_options_are_accepted_after_the_command():
    assert _hoist_globals(["snr", "--n", "3", "--device", "cpu", "--dtype=float64", "--debug"]) == \
        ["--device", "cpu", "--dtype=float64", "--debug", "snr", "--n", "3"]
    assert _hoist_globals(["lens", "--", "--device"]) == ["lens", "--", "--device"]  # after -- nothing moves


def test_dtype_reaches_the_loaded_models():
    res = CliRunner().invoke(app, ["hooks", "--pos", "2", "--dtype", "float64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert jobs.RUNTIME == {"device": "cpu", "dtype": "float64"}
    assert all(m.dtype == torch.float64 for m in jobs.load_models(None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_missing_cuda_device_is_one_line_before_any_work():
    res = CliRunner().invoke(app, ["snr", "--device", "cuda", "--n", "3"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [line for line in res.output.strip().splitlines() if line.startswith("error:")]
    assert "no CUDA device" in res.output


@pytest.mark.parametrize("args, msg", [(["--dtype", "int8"], "--dtype must be one of"),
                                       (["--device", "tpu"], "--device must be cpu, cuda or cuda:N")])
def test_bad_device_or_dtype(args, msg):
    res = CliRunner().invoke(app, ["hooks", *args])
    assert res.exit_code == 2 and msg in res.output
