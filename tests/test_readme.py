"""README.md stays true: its Python example runs on the shipped models, its commands exist."""

import re
import runpy
from pathlib import Path

import pytest

from diffmamba_interp.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_starts_with_the_two_setup_commands():
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]


def test_every_cli_command_in_the_readme_exists():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    used = set(re.findall(r"^diffmamba-interp (\w+)", README, re.M))
    assert used and used <= names


@pytest.mark.skipif(not (ROOT / "models" / "diffmamba2-babi" / "config.json").exists(), reason="shipped models not trained")
def test_python_example_runs(monkeypatch, tmp_path):
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(ROOT)
    script = tmp_path / "readme_example.py"  # a real file: nnsight reads the source of traced code
    script.write_text(code)
    scope = runpy.run_path(str(script))
    assert scope["logp"].shape[0] == scope["model"].cfg.n_layers + 1
    assert scope["block"].reconstruct is not None and scope["d"].shape[-1] == scope["model"].cfg.d_model
