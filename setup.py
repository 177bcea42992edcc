"""Build hook: the shipped models travel inside the package.

The top-level `models/` (each directory a checkpoint with its card, tokenizer and tuned lens) is the
source of truth and the only copy in git. Building a wheel copies every `models/*/` directory into
`diffmamba_interp/_models/`, where `diffmamba_interp.jobs.models_dir()` finds it once installed; an
editable install (`pip install -e .`) copies nothing and keeps reading the checkout's `models/`.
The sdist carries `models/` (MANIFEST.in), so a wheel built from the sdist has them too.
Everything else is in pyproject.toml.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"
PACKAGED = Path("diffmamba_interp") / "_models"  # inside the package, relative to build_lib


def model_files() -> list[Path]:
    """Every file of every model directory under models/, relative to models/ (hidden files and
    caches left out)."""
    if not MODELS.is_dir():
        return []
    files = []
    for model in sorted(p for p in MODELS.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(model.rglob("*")):
            rel = path.relative_to(MODELS)
            if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                files.append(rel)
    return files


class build_py_with_models(build_py):
    """build_py, then models/*/ copied to diffmamba_interp/_models/*/ in the build directory."""

    def _packaged(self) -> bool:
        return not getattr(self, "editable_mode", False)

    def run(self):
        super().run()
        if not self._packaged():
            return
        for rel in model_files():
            dst = Path(self.build_lib) / PACKAGED / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(MODELS / rel, dst)
            os.chmod(dst, 0o644)  # readable by every user of a system-wide install, whatever models/ had

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if self._packaged():
            outputs += [str(Path(self.build_lib) / PACKAGED / rel) for rel in model_files()]
        return outputs


setup(cmdclass={"build_py": build_py_with_models})
