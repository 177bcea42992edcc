"""The `diffmamba-interp` command line: thin commands over `jobs.py` and the Python API.

Results go to stdout (tables) or files (--json, --out); progress bars go to stderr. Bad input ends
with one line `error: ...` and exit code 2 (never a traceback, unless --debug, which is accepted
before or after the command), checked before any expensive work where it can be; output files are
written through a temporary file and a rename (files.write_atomic); `train` never overwrites a model
without --force; a closed stdout pipe (`| head`) ends a command quietly with exit code 141.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from . import __version__
from .analysis.lens import LENSES
from .analysis.patching import METHODS
from .analysis.snr import BOOTSTRAPS
from .config import ARCHS
from .errors import DiffMambaError, one_line
from .files import check_writable, write_atomic
from .jobs import PRESETS

_GLOBAL_FLAGS = ("--debug",)  # options of the app's callback that may also come after the subcommand
_GLOBAL_VALUES = ("--device", "--dtype")


def _hoist_globals(args: list[str]) -> list[str]:
    """`--debug`, `--device X` and `--dtype X` anywhere before a `--` (e.g. after the subcommand:
    `snr --debug --device cuda ...`) moved to the front, where the app's callback reads them."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    front, rest, i = [], [], 0
    while i < end:
        a = args[i]
        if a in _GLOBAL_FLAGS:
            front.append(a)
        elif a in _GLOBAL_VALUES and i + 1 < end:
            front += [a, args[i + 1]]
            i += 1
        elif a.split("=", 1)[0] in _GLOBAL_VALUES:
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest + args[end:]


class _Group(TyperGroup):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _hoist_globals(args))


app = typer.Typer(
    cls=_Group,
    help="Mechanistic interpretability for Mamba and Diff-Mamba models. With no --ckpt, commands use "
    "the two shipped models (models/mamba2-babi, models/diffmamba2-babi).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}
MAX_SEED = 2**32 - 1  # numpy's and random's seeds: whole numbers 0..2**32-1
MAX_HOOK_POS = 1024  # `hooks --pos`: the shapes differ only in their pos dimension; a forward pass of pos tokens runs
_OUTPUT_FILES = {"json_out": "--json", "out": "--out", "per_example": "--per-example"}  # parameters naming an output file


LensKind = Enum("LensKind", {name: name for name in LENSES}, type=str)  # the lens registry's names
Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # jobs.PRESETS
Bootstrap = Enum("Bootstrap", {name: name for name in BOOTSTRAPS}, type=str)  # what the bootstrap resamples
PatchMethod = Enum("PatchMethod", {name: name for name in METHODS}, type=str)  # analysis.patching.METHODS


def _value(option):
    return option.value if isinstance(option, Enum) else option


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


_DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")


def _set_runtime(device: str | None, dtype: str | None) -> None:
    """--device / --dtype checked (a CUDA device that is not there is an error, before any work) and
    handed to `jobs.load_models`."""
    import torch

    from .jobs import RUNTIME

    if dtype is not None and dtype not in _DTYPES:
        raise DiffMambaError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffMambaError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffMambaError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffMambaError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0..{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise DiffMambaError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    RUNTIME["device"], RUNTIME["dtype"] = str(dev), dtype


class _ErrorsOnly(io.TextIOBase):
    """stderr of a torchrun rank other than 0: only `error: ...` lines get through."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith("error:"):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (also accepted after the command)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available, "
                                         "else cpu; also accepted after the command)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (default), bfloat16, float16, float64 or auto "
                                        "(as stored; also accepted after the command)."),
) -> None:
    """Mechanistic interpretability for Mamba and Diff-Mamba models."""
    _state["debug"] = debug
    from .distributed import is_main

    main_rank = is_main()  # under torchrun: joins the process group, each rank on its own GPU
    try:
        _set_runtime(device, dtype)
    except DiffMambaError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if not main_rank:  # under torchrun: rank 0 prints tables, notes and bars; the other ranks only their errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
        sys.stderr = _ErrorsOnly(sys.stderr)
    if not debug:  # warnings (e.g. a multi-token answer) as one line each, without source lines
        warnings.showwarning = lambda message, category, *a, **k: typer.echo(f"warning: {message}", err=True)


def _check_options(kwargs: dict) -> None:
    """The options several commands share, checked before any work: --seed, --top, --example (against
    --n), and every output file (--json, --out) writable."""
    seed = kwargs.get("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise DiffMambaError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
    top = kwargs.get("top")
    if top is not None and top < 1:
        raise DiffMambaError(f"--top must be a positive number of tokens, got {top}")
    example = kwargs.get("example")
    if example is not None:
        n = kwargs.get("n")
        if example < 0:
            raise DiffMambaError(f"--example must be an example index >= 0, got {example}")
        several_lengths = "," in str(kwargs.get("data") or "")  # --n per length: the job checks the real count
        if n is not None and n >= 1 and example >= n and not several_lengths:
            raise DiffMambaError(f"--example {example} is out of range for --n {n} examples (0..{n - 1})")
    for name, flag in _OUTPUT_FILES.items():
        if isinstance(kwargs.get(name), Path):
            check_writable(kwargs[name], flag)
    if isinstance(kwargs.get("per_example"), Path):
        from .jobs import check_table_path

        check_table_path(kwargs["per_example"])


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (`| head`): stop quietly, as a tool killed by SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
    raise typer.Exit(141)


def _errors(fn):
    """Turn any failure into one line on stderr and exit code 2 (a traceback only with --debug); check
    the shared options first; exit quietly (code 141) when stdout is a closed pipe."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_options(kwargs)
            result = fn(*args, **kwargs)
            sys.stdout.flush()
            return result
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if _state["debug"]:
                raise
            msg = one_line(e, limit=10_000)
            if not isinstance(e, (DiffMambaError, FileNotFoundError)):
                msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
            try:
                typer.echo(f"error: {msg}", err=True)
            except BrokenPipeError:
                pass
            raise typer.Exit(2) from None

    return wrapper


def _print_table(df, floatfmt: str = "{:.4f}") -> None:
    typer.echo(df.to_string(index=False, float_format=lambda x: floatfmt.format(x)))


def _warn(message: str | None) -> None:
    """One line `warning: ...` on stderr (nothing for None)."""
    if message:
        typer.echo(f"warning: {message}", err=True)


def _write_per_example(path: Path | None, frame) -> None:
    """`--per-example`: one row per example × layer × model, CSV or Parquet by extension, atomically."""
    if path is not None:
        from .jobs import write_table

        write_table(path, frame)
        typer.echo(f"wrote {path}", err=True)


def _write_json(path: Path, obj) -> None:
    """JSON (strict: no NaN) through a temporary file and a rename (files.write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", what="--json")
    typer.echo(f"wrote {path}", err=True)


CKPT = typer.Option(None, "--ckpt", help="Checkpoint directory (repeat for several). Default: the two shipped models.")
DATA = typer.Option(None, "--data", help="babi:qa1 (default), babi:qa2:train, babilong:qa2:1k, paper or jsonl:PATH.")
N = typer.Option(None, "--n", help="Number of examples, a seeded sample (default 200; the paper preset: all 2,000).")
LENS = typer.Option(None, "--lens", help="auto (default: tuned where the checkpoint has a tuned lens, else logit), logit or tuned.")
SEED = typer.Option(0, "--seed", help="Seed for data sampling and bootstrap.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
PRESET = typer.Option(None, "--preset", help="paper: the Diff-Mamba paper's protocol (BABILong 0k, qa1-qa20, last 100 each, "
                      "shuffled with seed 42, tuned lens).")
BOOTSTRAP = typer.Option("story", "--bootstrap", help="What the CIs resample: story (questions of one story together) or question.")
CHUNK = typer.Option(None, "--chunk-size", help="Long prompts run in pieces of this many tokens, the state carried "
                     "(default 2048): memory stays bounded at any length.")
PER_EXAMPLE = typer.Option(None, "--per-example", help="Write every example × layer × model with every measure "
                           "(and its task, length, answer) as .csv, or .parquet (needs pyarrow).")
FILLER = typer.Option("books", "--filler", help="babilong filler: books (public-domain prose), babi (sentences of other bAbI "
                      "tasks: distractors) or a text file.")


CKPT_A = typer.Option(None, "--ckpt-a", help="Seeds of architecture a (repeat, or a glob): seed-level statistics.")
CKPT_B = typer.Option(None, "--ckpt-b", help="Seeds of architecture b (repeat, or a glob).")
ALL_SEEDS = typer.Option(False, "--all-seeds", help="Every shipped training seed: models/<name> and models/<name>-seed<k> "
                         "of both shipped models, as --ckpt-a/--ckpt-b.")


def _seed_groups(ckpt, ckpt_a, ckpt_b, all_seeds: bool) -> tuple[list, list] | None:
    """The checkpoints of the two architectures of a seed-level run (--ckpt-a/--ckpt-b, or --all-seeds:
    `jobs.shipped_seed_checkpoints`, named on stderr), or None for a run over --ckpt."""
    if all_seeds:
        if ckpt or ckpt_a or ckpt_b:
            raise DiffMambaError("--all-seeds picks the checkpoints itself: drop --ckpt, --ckpt-a and --ckpt-b")
        from .jobs import SHIPPED, display_path, shipped_seed_checkpoints

        found = shipped_seed_checkpoints()
        for name, paths in found.items():
            typer.echo(f"note: --all-seeds: {name}: {len(paths)} checkpoint(s): {', '.join(map(display_path, paths))}", err=True)
        return found[SHIPPED[0]], found[SHIPPED[1]]
    if not (ckpt_a or ckpt_b):
        return None
    if ckpt:
        raise DiffMambaError("give either --ckpt or --ckpt-a/--ckpt-b, not both")
    return list(ckpt_a or []), list(ckpt_b or [])


@app.command()
@_errors
def snr(
    ckpt: Optional[List[str]] = CKPT, data: Optional[str] = DATA, n: Optional[int] = N, lens: Optional[LensKind] = LENS,
    seed: int = SEED, preset: Optional[Preset] = PRESET, bootstrap: Bootstrap = BOOTSTRAP, filler: str = FILLER,
    chunk_size: Optional[int] = CHUNK,
    ckpt_a: Optional[List[str]] = CKPT_A, ckpt_b: Optional[List[str]] = CKPT_B, all_seeds: bool = ALL_SEEDS,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON (schema in the README)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write an HTML report (plotly, works offline)."),
    per_example: Optional[Path] = PER_EXAMPLE,
    quiet: bool = QUIET,
) -> None:
    """Per-layer needle probability, SNR (dB), rank and distractor ratio with 95% CIs, per model, plus
    paired differences (the paper's Figure 6 analysis; paper_layer is the figure's layer index).
    With --ckpt-a/--ckpt-b (or --all-seeds): across training seeds, per architecture and paired."""
    from .jobs import run_seed_snr, run_snr

    groups = _seed_groups(ckpt, ckpt_a, ckpt_b, all_seeds)
    if groups is not None:
        seeds = run_seed_snr(*groups, data, n, _value(lens), seed=seed, progress=not quiet,
                             preset=_value(preset), bootstrap=_value(bootstrap), filler=filler, chunk_size=chunk_size)
        typer.echo(seeds.title)
        _print_table(seeds.summary_table())
        typer.echo("\npaired difference of prob across seeds (b − a):")
        _print_table(seeds.paired_table())
        for note in seeds.result.notes:
            typer.echo(f"note: {note}", err=True)
        _warn(seeds.sample_warning())
        if json_out:
            _write_json(json_out, seeds.to_json())
        if out:
            typer.echo(f"wrote {seeds.write_report(out)}", err=True)
        _write_per_example(per_example, seeds.result.per_example)
        return

    run = run_snr(ckpt, data, n, _value(lens), seed=seed, progress=not quiet, preset=_value(preset),
                  bootstrap=_value(bootstrap), filler=filler, chunk_size=chunk_size)
    typer.echo(run.title)
    _print_table(run.summary_table())
    if len(run.result.paired):
        p = run.result.paired
        typer.echo("\npaired difference of prob (b − a):")
        _print_table(p[p.measure == "prob"].drop(columns="measure"))
    for note in run.result.notes:
        typer.echo(f"note: {note}", err=True)
    _warn(run.sample_warning())
    if json_out:
        _write_json(json_out, run.to_json())
    if out:
        typer.echo(f"wrote {run.write_report(out)}", err=True)
    _write_per_example(per_example, run.per_example_table())


@app.command()
@_errors
def lens(
    ckpt: Optional[List[str]] = CKPT,
    prompt: str = typer.Option(..., "--prompt", help="The prompt text."),
    answer: str = typer.Option(..., "--answer", help="The answer word (target = first token of ' ' + answer)."),
    lens: Optional[LensKind] = LENS, top: int = typer.Option(5, "--top", help="How many top tokens per layer."),
    chunk_size: Optional[int] = CHUNK,
) -> None:
    """Per-layer target probability and each layer's top tokens for one prompt."""
    from .jobs import lens_table, load_models

    models = load_models(ckpt)
    for model in models:
        if top > model.cfg.vocab_size:
            raise DiffMambaError(f"--top {top} is more than the vocabulary of {model.label} ({model.cfg.vocab_size} tokens)")
    for model in models:
        table = lens_table(model, prompt, answer, _value(lens) or "auto", top_k=top, chunk_size=chunk_size)
        typer.echo(f"== {model.label} ({model.cfg.arch}, {table.attrs['lens']} lens)")
        _print_table(table)


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
    ckpt: Optional[List[str]] = CKPT, data: Optional[str] = DATA, n: Optional[int] = N, lens: Optional[LensKind] = LENS,
    seed: int = SEED, preset: Optional[Preset] = PRESET, bootstrap: Bootstrap = BOOTSTRAP, filler: str = FILLER,
    chunk_size: Optional[int] = CHUNK,
    measure: str = typer.Option("prob", "--measure", help="prob, logprob, rank, snr_db, distractor_ratio or distractor_log_ratio."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write summary and paired tables as JSON."),
    quiet: bool = QUIET,
) -> None:
    """Side-by-side per-layer tables of two or more models, with paired differences."""
    from .jobs import run_snr

    run = run_snr(ckpt, data, n, _value(lens), seed=seed, progress=not quiet, preset=_value(preset),
                  bootstrap=_value(bootstrap), filler=filler, chunk_size=chunk_size)
    for note in run.result.notes:
        typer.echo(f"note: {note}", err=True)
    _warn(run.sample_warning())
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
    ckpt: Optional[List[str]] = CKPT, data: Optional[str] = DATA, n: Optional[int] = N, lens: Optional[LensKind] = LENS,
    seed: int = SEED, preset: Optional[Preset] = PRESET, bootstrap: Bootstrap = BOOTSTRAP, filler: str = FILLER,
    chunk_size: Optional[int] = CHUNK,
    out: Path = typer.Option(Path("reports/report.html"), "--out", help="The HTML report."),
    example: int = typer.Option(0, "--example", help="Which example's attention maps to show."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer for the attention maps (default: first differential)."),
    ckpt_a: Optional[List[str]] = CKPT_A, ckpt_b: Optional[List[str]] = CKPT_B, all_seeds: bool = ALL_SEEDS,
    eval_data: Optional[List[str]] = typer.Option(None, "--eval-data", help="Add the accuracy-by-context-length "
                                                  "section (as `eval`) on these data, e.g. babilong:qa1:0k,1k,2k,4k "
                                                  "(repeatable; babilong:qa1,qa2:0k,1k for several tasks). Default: none."),
    eval_n: Optional[int] = typer.Option(None, "--eval-n", help="Questions per task and length of that section "
                                         "(default 50)."),
    per_example: Optional[Path] = PER_EXAMPLE,
    quiet: bool = QUIET,
) -> None:
    """Everything in one self-contained HTML report: accuracy, SNR, paired differences, λ, branch lens, attention,
    attention to the needle, patching, tables; with --eval-data, accuracy by context length. With --ckpt-a/--ckpt-b
    (or --all-seeds): the report of the first checkpoint of each architecture plus the seed-level sections over all
    of them."""
    from .jobs import full_report, report_eval_options, run_seed_snr

    report_eval_options(eval_data, eval_n)  # --eval-data / --eval-n checked before any model is loaded
    seeds, groups = None, _seed_groups(ckpt, ckpt_a, ckpt_b, all_seeds)
    if groups is not None:
        seeds = run_seed_snr(*groups, data, n, _value(lens), seed=seed, progress=not quiet, preset=_value(preset),
                             bootstrap=_value(bootstrap), filler=filler, chunk_size=chunk_size)
        ckpt = [paths[0] for paths in seeds.ckpts.values()]  # the first of each architecture: seed 0 with --all-seeds
    run, path = full_report(ckpt, data, n, _value(lens), out, example=example, layer=layer, seed=seed, progress=not quiet,
                            preset=_value(preset), bootstrap=_value(bootstrap), filler=filler, chunk_size=chunk_size,
                            seeds=seeds, eval_data=eval_data, eval_n=eval_n)
    typer.echo(run.title)
    _print_table(run.summary_table())
    if run.evaluation is not None:
        typer.echo(f"\n{run.evaluation.title}")
        _print_table(run.evaluation.print_table())
    _warn(run.sample_warning())
    typer.echo(f"wrote {path}", err=True)
    _write_per_example(per_example, run.per_example_table())


@app.command("eval")
@_errors
def eval_(
    ckpt: Optional[List[str]] = CKPT,
    data: Optional[List[str]] = typer.Option(None, "--data", help="Data spec(s), repeatable: several lengths in one "
                                             "(babilong:qa1:0k,1k,2k,4k, the default), several tasks as "
                                             "babilong:qa1,qa2:0k,1k or one --data each."),
    n: Optional[int] = typer.Option(None, "--n", "-n", help="Questions per task (default 100, as upstream), the same "
                                    "questions at every length."),
    seed: int = SEED, filler: str = FILLER, chunk_size: Optional[int] = CHUNK,
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass (right-padded)."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Greedy generation: at most this many new tokens "
                                       "(upstream's 20; it stops at the first sentence's end). 0: argmax only."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML page: accuracy heat-maps by task × length per model "
                                       "and the ratio of each model to the first (plotly, offline)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="The accuracy table as .csv (or .parquet)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Table, ratios and every example's output as JSON."),
    quiet: bool = QUIET,
) -> None:
    """Accuracy by task and context length (the paper's BABILong result): argmax at the last prompt
    position and greedy generation scored as upstream (the target alone in the first sentence)."""
    from .jobs import check_table_path, eval_specs, run_eval, write_table
    from .report.accuracy import length_label

    eval_specs(data)  # every spec checked before any model is loaded
    if csv is not None:
        check_table_path(csv, "--csv")
        check_writable(csv, "--csv")
    run = run_eval(ckpt, data, n, seed=seed, filler=filler, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   chunk_size=chunk_size, progress=not quiet)
    typer.echo(run.title)
    _print_table(run.print_table())
    ratio = run.ratio_tables()
    if len(ratio):
        typer.echo(f"\naccuracy ratio to {run.result.labels[0]} (b / a):")
        columns = ["model_b", "scorer", "task", "length", "accuracy_a", "accuracy_b", "ratio"]
        _print_table(ratio[columns].assign(length=[length_label(x) for x in ratio["length"]]))
    if csv is not None:
        write_table(csv, run.table, what="--csv")
        typer.echo(f"wrote {csv}", err=True)
    if json_out:
        _write_json(json_out, run.to_json())
    if out:
        typer.echo(f"wrote {run.write_report(out)}", err=True)


@app.command()
@_errors
def patch(
    ckpt: Optional[List[str]] = CKPT,
    clean: str = typer.Option(..., "--clean", help="The clean prompt."),
    corrupt: str = typer.Option(..., "--corrupt", help="The corrupted prompt (same number of tokens)."),
    answer: str = typer.Option(..., "--answer", help="The clean answer word."),
    wrong: Optional[str] = typer.Option(None, "--wrong", help="The corrupted answer: metric = logit difference "
                                        "(without it: the answer's probability)."),
    what: str = typer.Option("resid", "--what", help="resid, mixer, branch (each branch of a differential layer), state "
                             "(each scan unit's SSM state, the recurrence carried), or a hook name with {layer}."),
    method: PatchMethod = typer.Option(PatchMethod.exact, "--method", help="exact, or attribution (the gradient "
                                       "estimate: one forward and one backward)."),
    positions: Optional[str] = typer.Option(None, "--positions", help="a:b: only positions a..b-1 (negative from the end)."),
    conv: bool = typer.Option(False, "--conv", help="State patching also takes the clean conv state."),
    batch_size: int = typer.Option(32, "--batch-size", help="Patched cells per forward pass."),
    chunk_size: Optional[int] = CHUNK,
    out: Path = typer.Option(Path("reports/patching.html"), "--out", help="HTML report with one heat-map per model."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Every cell as CSV (model, component, layer, hook, position, "
                                       "token, value, normalized)."),
    quiet: bool = QUIET,
) -> None:
    """Activation, state or attribution patching from a clean prompt into a corrupted one, over layers × positions."""
    from .analysis.patching import patch as run_patch
    from .attention_views import parse_positions
    from .differential import Differential
    from .jobs import load_models, tokenizer_of
    from .report.html import write_report

    if csv is not None:
        check_writable(csv, "--csv")
    if batch_size <= 0:
        raise DiffMambaError(f"--batch-size must be positive, got {batch_size}")
    models = load_models(ckpt)
    if what == "branch":
        plain = [m for m in models if not any(isinstance(b, Differential) for b in m.modules())]
        if len(plain) == len(models):
            raise DiffMambaError("--what branch needs a model with differential layers; none of the models has any")
        for m in plain:
            typer.echo(f"note: {m.label} has no differential layers: skipped for --what branch", err=True)
        models = [m for m in models if m not in plain]
    results = []
    for m in models:
        L = len(tokenizer_of(m).encode(corrupt, add_special_tokens=False))
        a, b = parse_positions(positions, L) if positions else (0, L)
        res = run_patch(m, clean, corrupt, answer=answer, wrong=wrong, what=what, method=method.value,
                        positions=list(range(a, b)), conv=conv, batch_size=batch_size, chunk_size=chunk_size,
                        progress=not quiet)
        res.frame.insert(0, "model", m.label)
        res.model = m.label
        results.append(res)
        top = res.frame.reindex(res.frame["normalized"].abs().sort_values(ascending=False).index).head(10)
        typer.echo(f"== {m.label} ({m.cfg.arch}): {res.metric} clean {res.clean_metric:.4f}, corrupted "
                   f"{res.corrupt_metric:.4f}; the 10 largest effects ({method.value} patching of {what}):")
        _print_table(top.drop(columns=["model"]))
    if csv is not None:
        import pandas as pd

        frame = pd.concat([r.frame for r in results], ignore_index=True)
        write_atomic(csv, frame.to_csv(index=False))
        typer.echo(f"wrote {csv}", err=True)
    meta = {"clean": clean, "corrupt": corrupt, "answer": answer, "wrong": wrong or "(none: answer probability)",
            "what": what, "method": method.value}
    path = write_report(out, title=f"Patching: {what} ({method.value})", patching=results, meta=meta)
    typer.echo(f"wrote {path}", err=True)


@app.command("lens-train")
@_errors
def lens_train(
    ckpt: str = typer.Option(..., "--ckpt", help="The checkpoint directory to fit a tuned lens for."),
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file to fit on (default: the shipped public-domain books)."),
    data: Optional[str] = typer.Option(None, "--data", help="Fit on a data spec's prompts + answers instead (task text)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write tuned_lens.* (default: the checkpoint directory)."),
    steps: int = typer.Option(250, "--steps"), batch: int = typer.Option(8, "--batch"),
    seq_len: int = typer.Option(128, "--seq-len"), lr: Optional[float] = typer.Option(None, "--lr"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Belrose et al.: Nesterov, wd 1e-3, linear decay, clip 1) or adam."),
    eval_data: str = typer.Option("babi:qa1", "--eval-data", help="Prompts for the KL at the answer position."),
    eval_n: int = typer.Option(100, "--eval-n"), seed: int = SEED,
    force: bool = typer.Option(False, "--force", help="Replace an existing tuned lens."), quiet: bool = QUIET,
) -> None:
    """Fit a tuned lens for any checkpoint (Belrose et al.'s recipe on general text by default) and
    report its per-layer held-out KL against the logit lens, at all positions and at answer positions."""
    from .jobs import lens_train as job

    for name, value in (("--steps", steps), ("--batch", batch), ("--seq-len", seq_len), ("--eval-n", eval_n)):
        if value <= 0:
            raise DiffMambaError(f"{name} must be positive, got {value}")
    _, table, target = job(ckpt, str(text) if text else None, data, str(out) if out else None, steps=steps, seed=seed,
                           batch=batch, seq_len=seq_len, optimizer=optimizer, lr=lr, eval_data=eval_data, eval_n=eval_n,
                           force=force, progress=not quiet)
    typer.echo("held-out KL(final ‖ lens) per layer, nats (all positions; answer positions):")
    _print_table(table)
    typer.echo(f"wrote {target}", err=True)


@app.command()
@_errors
def hooks(ckpt: Optional[List[str]] = CKPT, pos: int = typer.Option(4, "--pos", help="Sequence length for the shapes.")) -> None:
    """The hook names and the shapes they see on a [1, pos] input."""
    from .jobs import load_models

    if not 1 <= pos <= MAX_HOOK_POS:
        raise DiffMambaError(f"--pos must be from 1 to {MAX_HOOK_POS} (the shapes differ only in their pos dimension), got {pos}")
    for model in load_models(ckpt):
        typer.echo(f"== {model.label} ({model.cfg.arch}, {model.cfg.n_layers} layers)")
        df = model.hook_shapes(pos)
        df["shape"] = df["shape"].map(lambda s: "[" + ", ".join(map(str, s)) + "]")
        typer.echo(df.to_string(index=False))


@app.command()
@_errors
def train(
    arch: Arch = typer.Option("mamba2", "--arch"),
    out_dir: Path = typer.Option(..., "--out", help="Output checkpoint directory (new or empty, or --force)."),
    steps: int = typer.Option(2000, "--steps"), seed: int = SEED,
    tasks: str = typer.Option("qa1,qa2,qa3,qa4,qa5", "--tasks", help="Comma-separated bAbI tasks to train on (of "
                              "qa1-qa5); the first is the one --task-curriculum and --first-task-share name."),
    d_model: int = typer.Option(64, "--d-model"), n_layers: int = typer.Option(4, "--n-layers"),
    d_state: int = typer.Option(16, "--d-state", help="SSM state size N per head."),
    batch_size: int = typer.Option(32, "--batch-size"), lr: float = typer.Option(3e-3, "--lr"),
    loss: str = typer.Option("answer", "--loss", help="answer (answer token only) or lm (answer + 0.1 x next-token loss)."),
    lengths: str = typer.Option("512,1024", "--lengths", help="BABILong lengths (tokens) of the filler batches."),
    filler_share: float = typer.Option(0.3, "--filler-share", help="Share of batches with book filler after the curriculum."),
    curriculum: float = typer.Option(0.3, "--curriculum", help="Share of the steps (from the start) at 0k only."),
    task_curriculum: float = typer.Option(0.3, "--task-curriculum", help="Share of the steps (from the start) on qa1 only."),
    first_task_share: float = typer.Option(0.4, "--first-task-share", help="Share of the rows from qa1 (the first task) after that."),
    story_share: float = typer.Option(0.7, "--story-share", help="Share of the 0k batches that are whole stories "
                                      "(every question of a story answered in one row)."),
    every_person: bool = typer.Option(False, "--every-person", help="qa1: also ask, at each question, where every "
                                      "person moved so far is (an experiment against the last-mentioned-place "
                                      "shortcut; not in the shipped recipe: see the README)."),
    answer_end: bool = typer.Option(False, "--answer-end", help='Follow each answer by "." and score it too, so '
                                    "greedy generation stops after the answer (the shipped recipe's last stage)."),
    d_conv: int = typer.Option(4, "--d-conv", help="Causal conv width (the GPU kernels take 2-4)."),
    lens_steps: int = typer.Option(250, "--lens-steps", help="Tuned-lens training steps on the shipped books (0: none)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Continue training from this checkpoint's weights."),
    eval_n: Optional[int] = typer.Option(None, "--eval-n", help="Test examples per task for the accuracy (default: all)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Measure the learning curve every N steps (0: never)."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    force: bool = typer.Option(False, "--force", help="Replace the model in a non-empty --out directory (its weights, "
                               "config, card, training.json, tuned lens and tokenizer files are removed first)."),
    quiet: bool = QUIET,
) -> None:
    """Train a small model on bAbI qa1–qa5 with book filler (CPU), evaluate it, fit its tuned lens, save all."""
    from .data.subword import build_subword_tokenizer
    from .train import TrainConfig, check_options, check_output_dir, write_run
    from .train import train as run_training

    try:
        length_list = tuple(int(x) for x in lengths.split(","))
    except ValueError:
        raise DiffMambaError(f"--lengths must be comma-separated token counts, got {lengths!r}") from None
    for name, value in (("--eval-every", eval_every), ("--threads", threads)):
        if value < 0:
            raise DiffMambaError(f"{name} must be >= 0, got {value}")
    cfg = TrainConfig(arch=arch.value, steps=steps, seed=seed, tasks=tuple(t.strip() for t in tasks.split(",")),
                      d_model=d_model, n_layers=n_layers, d_state=d_state, d_conv=d_conv, batch_size=batch_size,
                      lr=lr, init=str(init) if init else None, loss=loss, lengths=length_list, filler_share=filler_share,
                      curriculum=curriculum, story_share=story_share, task_curriculum=task_curriculum,
                      first_task_share=first_task_share, every_person=every_person, answer_end=answer_end)
    cfg.check()
    check_output_dir(out_dir, force=force)  # never overwrite a model without --force
    if threads:
        import torch

        torch.set_num_threads(threads)
    tokenizer = build_subword_tokenizer(cfg.vocab_size)
    check_options(cfg, tokenizer, eval_n=eval_n, lens_steps=lens_steps)  # every option, before any training
    model, result = run_training(cfg, tokenizer, progress=not quiet, eval_n=eval_n, eval_every=eval_every)
    command = "diffmamba-interp " + " ".join(sys.argv[1:])
    write_run(model, result, out_dir, command, lens_steps=lens_steps, seed=seed, progress=not quiet)
    _print_table(result.accuracy)
    typer.echo(f"wrote {out_dir}", err=True)


if __name__ == "__main__":
    app()
