"""The installation keeps the pinned torch and exposes the console script."""

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_torch_is_the_pinned_build():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    assert "torch" in pins
    assert torch.__version__.split("+")[0] == pins["torch"]


def test_console_script_installed():
    exe = Path(sys.executable).parent / "diffmamba-interp"  # the venv's bin, whether or not it is on PATH
    assert exe.exists()
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("diffmamba-interp ")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "set -euo pipefail" in ci
    last = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set "))][-1].strip()
    assert last == "make test" and "make test" in readme
