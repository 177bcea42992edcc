"""The example notebooks in notebooks/.

Always: each stored notebook is valid, has no outputs / execution counts and no absolute paths, and
notebooks/README.md indexes it. When the shipped models exist (``models/mamba2-babi`` and
``models/diffmamba2-babi``, or ``$DIFFMAMBA_MODELS``, which the kernel inherits): each notebook is
executed top to bottom in a Jupyter kernel running this interpreter, from a temporary copy with the
repository root as working directory, and its outputs are checked for what it is meant to show.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parent.parent
NB_DIR = REPO / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_lens_and_snr.ipynb", "03_implicit_attention.ipynb",
             "04_recurrent_mode_and_paper_protocol.ipynb", "05_interventions.ipynb", "06_shipped_models_and_seeds.ipynb")
ABSOLUTE_PATH = re.compile(r"/work/|/tmp/|/root|/home/")
PLOTLY = "application/vnd.plotly.v1+json"
KERNEL_MARKER = "KERNEL_PREFIX="
MAX_SECONDS = 300  # each notebook takes ~15 s on 2 busy CPU cores, kernel start included

# what each executed notebook must show: the last cell's marker, strings somewhere in its text/table
# outputs, and how many plotly figures it displays
EXPECTED = {
    "01_quickstart.ipynb": dict(
        marker="notebook 01 OK",
        texts=["hooks in diffmamba2-babi", "blocks.0.hook_lambda", "blocks.0.mixer_1.hook_dt", "λ (hook_lambda)",
               "nnsight: p(", "block 2 zeroed", "λ = 0 in all differential blocks", "mean p(answer)"],
        figures=0,
    ),
    "02_lens_and_snr.ipynb": dict(
        marker="notebook 02 OK",
        texts=["50 examples", "prob_mean", "snr_db_mean", "tuned − logit", "top_tokens", "-λ·mixer_2", "mixer_1"],
        figures=4,
    ),
    "04_recurrent_mode_and_paper_protocol.ipynb": dict(
        marker="notebook 04 OK",
        texts=["two pieces vs one run", "greedy continuation", "state has seen", "p('", "-> ", "paper-protocol questions",
               "paper preset on the shipped models", "paper_layer"],
        figures=0,
    ),
    "03_implicit_attention.ipynb": dict(
        marker="notebook 03 OK",
        texts=["using block 0", "differential", "Mamba-2 block 0", "reconstruction max error", "scan error",
               "block error", "float64", "output-space operator", "answer-row maps", "sources pushing the answer logit"],
        figures=2,
    ),
    "06_shipped_models_and_seeds.ipynb": dict(
        marker="notebook 06 OK",
        texts=["6 shipped checkpoints", "tokenizer entries: 3072", "(one token)", "accuracy by task and length",
               "accuracy_generate", "the paper's comparison", "seed-level p(answer)", "n_seeds",
               "diffs6: block 0 parameters", "x1_proj", "diffs6mamba2: block 0 parameters", "lambda_q1", "in_proj1"],
        figures=0,
    ),
    "05_interventions.ipynb": dict(
        marker="notebook 05 OK",
        texts=["MambaActivationCache", "decompose_resid: the terms sum to the final residual", "0_-λ·mixer_2",
               "logit_attrs sum", "logit attribution (kitchen − garden)", "TransformerLens vs patch(what='resid')",
               "branch patching", "state patching", "attribution vs exact", "read without capture_states",
               "two invokes in one trace", "lengths [", "× <pad>"],
        figures=5,
    ),
}


def _read(name: str):
    return nbformat.read(NB_DIR / name, as_version=4)


def _models_present() -> tuple[bool, str]:
    from diffmamba_interp.jobs import SHIPPED, models_dir

    root = models_dir()
    missing = [name for name in SHIPPED if not (root / name / "config.json").is_file()]
    if missing:
        return False, f"shipped model {root / missing[0]} not found (run `make models`, or set DIFFMAMBA_MODELS)"
    return True, ""


def test_every_notebook_is_listed():
    on_disk = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS)
    index = (NB_DIR / "README.md").read_text(encoding="utf-8")
    for name in NOTEBOOKS:
        assert name in index, f"notebooks/README.md does not mention {name}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_is_clean(name):
    raw = (NB_DIR / name).read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells)
    for c in code:
        assert c.get("outputs") == [], f"{name}: stored with outputs (clear them before saving): {c.source[:60]!r}"
        assert c.get("execution_count") is None, f"{name}: stored with execution counts"
    found = ABSOLUTE_PATH.search(raw)
    assert found is None, f"{name}: absolute path {raw[max(0, found.start() - 30):found.end() + 30]!r}"
    # the models are found through the package, never through a path written in the notebook
    assert "default_checkpoints()" in raw


def _output_text(nb) -> tuple[str, int]:
    """All stream, text/plain and text/html output of an executed notebook, and its plotly figure count."""
    parts, figures = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                parts.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                data = o.get("data", {})
                figures += PLOTLY in data
                parts += [data[k] for k in ("text/plain", "text/html") if k in data and isinstance(data[k], str)]
    return "\n".join(parts), figures


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    ok, reason = _models_present()
    if not ok:
        pytest.skip(reason)
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    copy = tmp_path / name
    shutil.copy(NB_DIR / name, copy)
    nb = nbformat.read(copy, as_version=4)
    # first, a cell that tells which interpreter the kernel runs (it must be this venv's)
    nb.cells.insert(0, nbformat.v4.new_code_cell(f"import sys; print({KERNEL_MARKER!r} + sys.prefix)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    seconds = time.perf_counter() - start
    nbformat.write(nb, tmp_path / f"executed_{name}")  # kept for debugging a failure

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code"), "a cell did not run"

    first = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert f"{KERNEL_MARKER}{sys.prefix}" in first, f"kernel runs another interpreter: {first!r} (expected {sys.prefix})"

    text, figures = _output_text(nb)
    want = EXPECTED[name]
    assert want["marker"] in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    missing = [t for t in want["texts"] if t not in text]
    assert not missing, f"{name}: outputs lack {missing}"
    assert figures >= want["figures"], f"{name}: {figures} plotly figures, expected {want['figures']}"
    assert "Traceback" not in text
    assert seconds < MAX_SECONDS, f"{name} took {seconds:.0f} s"
    print(f"{name}: {seconds:.1f} s")
