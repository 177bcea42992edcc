"""The `diffmamba-interp` command line: thin commands over `jobs.py` and the Python API.

Results go to stdout (tables) or files (--json, --out); progress bars go to stderr. Bad input ends
with one line `error: ...` and exit code 2 (never a traceback, unless --debug).
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .analysis.lens import LENSES
from .config import ARCHS
from .errors import DiffMambaError, one_line

app = typer.Typer(
    help="Mechanistic interpretability for Mamba and Diff-Mamba models. With no --ckpt, commands use "
    "the two shipped models (models/mamba2-babi, models/diffmamba2-babi).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


LensKind = Enum("LensKind", {name: name for name in LENSES}, type=str)  # the lens registry's names


class MapKind(str, Enum):
    s6 = "s6"
    block = "block"
    output = "output"


class AttentionView(str, Enum):
    full = "full"
    row = "row"


class Reduce(str, Enum):
    mean = "mean"
    absmean = "absmean"


Arch = Enum("Arch", {a: a for a in ARCHS}, type=str)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffmamba-interp {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Mechanistic interpretability for Mamba and Diff-Mamba models."""
    _state["debug"] = debug
    if not debug:  # warnings (e.g. a multi-token answer) as one line each, without source lines
        warnings.showwarning = lambda message, category, *a, **k: typer.echo(f"warning: {message}", err=True)


def _errors(fn):
    """Turn any failure into one line on stderr and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if _state["debug"]:
                raise
            msg = one_line(e, limit=10_000)
            if not isinstance(e, (DiffMambaError, FileNotFoundError)):
                msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _print_table(df, floatfmt: str = "{:.4f}") -> None:
    typer.echo(df.to_string(index=False, float_format=lambda x: floatfmt.format(x)))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    typer.echo(f"wrote {path}", err=True)


CKPT = typer.Option(None, "--ckpt", help="Checkpoint directory (repeat for several). Default: the two shipped models.")
DATA = typer.Option("babi:qa1", "--data", help="babi:qa1, babi:qa2:train, babilong:qa2:1k or jsonl:PATH.")
N = typer.Option(200, "--n", help="Number of examples.")
LENS = typer.Option("logit", "--lens", help=f"{' or '.join(LENSES)} (tuned: the lens saved in the checkpoint directory).")
SEED = typer.Option(0, "--seed", help="Seed for data sampling and bootstrap.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


@app.command()
@_errors
def snr(
    ckpt: Optional[List[str]] = CKPT, data: str = DATA, n: int = N, lens: LensKind = LENS, seed: int = SEED,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON (schema in the README)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write an HTML report (plotly, works offline)."),
    quiet: bool = QUIET,
) -> None:
    """Per-layer needle probability, SNR (dB), rank and distractor ratio with 95% CIs, per model, plus
    paired differences (the paper's Figure 6 analysis)."""
    from .jobs import run_snr

    run = run_snr(ckpt, data, n, lens.value, seed=seed, progress=not quiet)
    _print_table(run.layer_table())
    if len(run.result.paired):
        p = run.result.paired
        typer.echo("\npaired difference of prob (b − a):")
        _print_table(p[p.measure == "prob"].drop(columns="measure"))
    for note in run.result.notes:
        typer.echo(f"note: {note}", err=True)
    if json_out:
        _write_json(json_out, run.to_json())
    if out:
        typer.echo(f"wrote {run.write_report(out)}", err=True)


@app.command()
@_errors
def lens(
    ckpt: Optional[List[str]] = CKPT,
    prompt: str = typer.Option(..., "--prompt", help="The prompt text."),
    answer: str = typer.Option(..., "--answer", help="The answer word (target = first token of ' ' + answer)."),
    lens: LensKind = LENS, top: int = typer.Option(5, "--top", help="How many top tokens per layer."),
) -> None:
    """Per-layer target probability and each layer's top tokens for one prompt."""
    from .jobs import lens_table, load_models

    for model in load_models(ckpt):
        typer.echo(f"== {model.label} ({model.cfg.arch}, {lens.value} lens)")
        _print_table(lens_table(model, prompt, answer, lens.value, top_k=top))


@app.command()
@_errors
def attention(
    ckpt: Optional[List[str]] = CKPT,
    prompt: str = typer.Option(..., "--prompt", help="The prompt text."),
    layer: int = typer.Option(..., "--layer", help="Block index i of blocks.{i}."),
    branch: Optional[int] = typer.Option(None, "--branch", help="1 or 2: one branch of a differential layer."),
    kind: MapKind = typer.Option(MapKind.s6, "--kind", help="s6 (the scan operator), block (conv, gate, norm folded in) "
                                 "or output (the norm of the operator the whole block applies in its output space)."),
    reduce: Reduce = typer.Option(Reduce.mean, "--reduce", help="Aggregate over channels/heads."),
    view: AttentionView = typer.Option(AttentionView.full, "--view", help="full: target × source maps (averaged over "
                                       "blocks above --max-side); row: the answer row, what the last position reads."),
    positions: Optional[str] = typer.Option(None, "--positions", help="a:b: only positions a..b-1 (negative from the end)."),
    answer: Optional[str] = typer.Option(None, "--answer", help="Row view: the answer word, for each source's push on its logit."),
    needle: Optional[List[str]] = typer.Option(None, "--needle", help="Row view: prompt text to shade (repeatable)."),
    max_side: int = typer.Option(128, "--max-side", help="Full view: cells a side before averaging over blocks."),
    max_mb: float = typer.Option(10.0, "--max-mb", help="Refuse to write an HTML page above this size (MB)."),
    out: Path = typer.Option(Path("reports/attention.html"), "--out", help="HTML file with the figures."),
) -> None:
    """Implicit attention of one layer (each branch and the differential summary), as full maps or the answer row."""
    from .jobs import attention_entry, load_models
    from .report.long_context import write_attention_report

    if branch not in (None, 1, 2):
        raise DiffMambaError(f"--branch must be 1 or 2, got {branch}")
    entries = [attention_entry(m, prompt, layer, branch, kind.value, reduce.value, view.value, positions, max_side,
                               answer, needle or ()) for m in load_models(ckpt)]
    for e in entries:
        names = e["rows"] if e.get("view") == "row" else e["maps"]
        typer.echo(f"{e['title']}: maps {', '.join(names)} over {len(e['tokens'])} positions")
    path = write_attention_report(out, title=f"Implicit attention, block {layer}", entries=entries,
                                  meta={"prompt": prompt if len(prompt) <= 300 else prompt[:300] + " …", "kind": kind.value,
                                        "reduce": reduce.value, "view": view.value}, max_bytes=int(max_mb * 2**20))
    typer.echo(f"wrote {path}", err=True)


@app.command()
@_errors
def compare(
    ckpt: Optional[List[str]] = CKPT, data: str = DATA, n: int = N, lens: LensKind = LENS, seed: int = SEED,
    measure: str = typer.Option("prob", "--measure", help="prob, logprob, rank, snr_db or distractor_ratio."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write summary and paired tables as JSON."),
    quiet: bool = QUIET,
) -> None:
    """Side-by-side per-layer tables of two or more models, with paired differences."""
    from .jobs import run_snr

    run = run_snr(ckpt, data, n, lens.value, seed=seed, progress=not quiet)
    s = run.result.summary
    if measure not in set(s.measure):
        raise DiffMambaError(f"unknown measure {measure!r}; expected one of {sorted(set(s.measure))}")
    wide = s[s.measure == measure].pivot(index="layer", columns="model", values="mean")[run.result.labels]
    typer.echo(f"mean {measure} per layer:")
    typer.echo(wide.to_string(float_format=lambda x: f"{x:.4f}"))
    p = run.result.paired
    if len(p):
        typer.echo(f"\npaired difference of {measure} (b − a) with 95% CI:")
        _print_table(p[p.measure == measure].drop(columns="measure"))
    if json_out:
        doc = run.to_json()
        _write_json(json_out, {"summary": doc["models"], "paired": doc["paired"]})


@app.command()
@_errors
def report(
    ckpt: Optional[List[str]] = CKPT, data: str = DATA, n: int = N, lens: LensKind = LENS, seed: int = SEED,
    out: Path = typer.Option(Path("reports/report.html"), "--out", help="The HTML report."),
    example: int = typer.Option(0, "--example", help="Which example's attention maps to show."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer for the attention maps (default: first differential)."),
    quiet: bool = QUIET,
) -> None:
    """Everything in one self-contained HTML report: SNR, paired differences, branch lens, attention, tables."""
    from .jobs import full_report

    run, path = full_report(ckpt, data, n, lens.value, out, example=example, layer=layer, seed=seed, progress=not quiet)
    _print_table(run.layer_table())
    typer.echo(f"wrote {path}", err=True)


@app.command()
@_errors
def hooks(ckpt: Optional[List[str]] = CKPT, pos: int = typer.Option(4, "--pos", help="Sequence length for the shapes.")) -> None:
    """The hook names and the shapes they see on a [1, pos] input."""
    from .jobs import load_models

    if pos <= 0:
        raise DiffMambaError(f"--pos must be positive, got {pos}")
    for model in load_models(ckpt):
        typer.echo(f"== {model.label} ({model.cfg.arch}, {model.cfg.n_layers} layers)")
        df = model.hook_shapes(pos)
        df["shape"] = df["shape"].map(lambda s: "[" + ", ".join(map(str, s)) + "]")
        typer.echo(df.to_string(index=False))


@app.command()
@_errors
def train(
    arch: Arch = typer.Option("mamba2", "--arch"),
    out: Path = typer.Option(..., "--out", help="Output checkpoint directory."),
    steps: int = typer.Option(2000, "--steps"), seed: int = SEED,
    d_model: int = typer.Option(64, "--d-model"), n_layers: int = typer.Option(4, "--n-layers"),
    batch_size: int = typer.Option(32, "--batch-size"), lr: float = typer.Option(3e-3, "--lr"),
    lens_steps: int = typer.Option(300, "--lens-steps", help="Tuned-lens training steps (0: none)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Continue training from this checkpoint's weights."),
    eval_n: Optional[int] = typer.Option(None, "--eval-n", help="Test examples per task for the accuracy (default: all)."),
    quiet: bool = QUIET,
) -> None:
    """Train a small model on bAbI qa1–qa5 (CPU), evaluate it, train its tuned lens, save all."""
    from .data import build_babi_tokenizer
    from .train import TrainConfig, save_run, train_tuned_lens
    from .train import train as run_training

    if steps <= 0:
        raise DiffMambaError(f"--steps must be positive, got {steps}")
    cfg = TrainConfig(arch=arch.value, steps=steps, seed=seed, d_model=d_model, n_layers=n_layers,
                      batch_size=batch_size, lr=lr, init=str(init) if init else None)
    model, result = run_training(cfg, build_babi_tokenizer(), progress=not quiet, eval_n=eval_n)
    command = "diffmamba-interp " + " ".join(sys.argv[1:])
    save_run(model, result, out, command)
    if lens_steps:
        train_tuned_lens(model, out, steps=lens_steps, seed=seed, progress=not quiet)
    _print_table(result.accuracy)
    typer.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    app()
