"""A wheel built from the repo (through its sdist, as `python -m build` does) carries the shipped models,
the packaged data and their licences, and once installed runs `diffmamba-interp snr` from any directory."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from diffmamba_interp.jobs import SHIPPED

ROOT = Path(__file__).resolve().parent.parent
# what a model directory holds (tuned_lens.* checked separately: at least one file)
CARD = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", "training.json"}
LICENCES = ["data/babi/LICENSE.txt", "data/babi/NOTICE.txt", "data/filler/LICENSE.txt", "data/filler/README.txt"]
# left out of the copy the build runs in: the build never writes into the checkout other sessions use
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "reports", ".whl", ".gl", "*.pyc")


def files_under(root: Path) -> list[str]:
    """Non-hidden files under root, relative, as POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                             for part in p.relative_to(root).parts))


def model_files(root: Path) -> list[str]:
    """Every file of every model directory under root/models/, relative to models/."""
    return [f for d in sorted((root / "models").iterdir()) if d.is_dir() and not d.name.startswith(".")
            for f in (f"{d.name}/{rel}" for rel in files_under(d))]


def build(kind: str, src: Path, out: Path) -> Path:
    """setuptools' PEP 517 backend, as pip and `python -m build` call it, offline and without isolation."""
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=SKIP)
    sdist = build("sdist", tmp / "src", tmp / "dist")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp / "unpacked", filter="data")
    top = names[0].split("/")[0]
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    missing = [f"models/{f}" for f in model_files(tmp / "src") if f"models/{f}" not in rel]
    missing += [f"diffmamba_interp/{f}" for f in LICENCES if f"diffmamba_interp/{f}" not in rel]
    assert not missing, f"not in the sdist: {missing[:5]}"
    return build("wheel", tmp / "unpacked" / top, tmp / "dist"), tmp / "src"


def test_wheel_carries_models_data_and_licences(wheel):
    wheel, src = wheel  # src: the copy of the checkout it was built from (models/ may grow meanwhile)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = model_files(src)
    assert {name.split("/")[0] for name in shipped} >= set(SHIPPED)
    missing = [f for f in shipped if f"diffmamba_interp/_models/{f}" not in names]
    assert not missing, f"model files not in the wheel: {missing}"
    for name in SHIPPED:
        files = {f.split("/", 1)[1] for f in shipped if f.startswith(name + "/")}
        assert CARD <= files and any(f.startswith("tuned_lens.") for f in files), (name, files)
    data = [f"diffmamba_interp/data/{f}" for f in files_under(src / "diffmamba_interp" / "data")]
    missing = [f for f in data + [f"diffmamba_interp/{f}" for f in LICENCES] if f not in names]
    assert not missing, f"package files not in the wheel: {missing[:5]}"
    assert not [n for n in names if n.startswith(("models/", "tests/"))]  # inside the package, nowhere else
    modes = {info.filename: info.external_attr >> 16 for info in zipfile.ZipFile(wheel).infolist()}
    assert all(modes[f"diffmamba_interp/_models/{f}"] & 0o444 == 0o444 for f in shipped)  # readable by all


@pytest.mark.slow
def test_installed_wheel_runs_snr_outside_the_tree(wheel, tmp_path):
    wheel, _ = wheel
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFMAMBA_MODELS", "PYTHONPATH")}
    env["PIP_CONSTRAINT"] = str(ROOT / "constraints.txt")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    proc = subprocess.run(pip, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the installed copy, not the checkout's editable one (its finder comes after PYTHONPATH)
    env["PYTHONPATH"] = str(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import diffmamba_interp, diffmamba_interp.jobs as j; print(diffmamba_interp.__file__); print(j.models_dir())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, models = proc.stdout.split()
    assert Path(where).is_relative_to(site) and Path(models) == site / "diffmamba_interp" / "_models"

    script = site / "bin" / "diffmamba-interp"
    assert script.exists()
    proc = subprocess.run([str(script), "snr", "--n", "4", "-q"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for name in SHIPPED:
        assert rows.count(name) >= 2, proc.stdout  # one row per layer
    assert not (elsewhere / "models").exists()
