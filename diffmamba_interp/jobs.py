"""The toolkit's main jobs as Python functions: the CLI commands and the notebooks call these.

checkpoint -> model -> analysis -> DataFrame -> JSON / HTML report. Nothing here prints; the CLI
formats what these return.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .analysis.stats import proportion_interval
from .errors import DiffMambaError
from .schemas import ACCURACY_COLUMNS, LAMBDA_COLUMNS, few_clusters_warning

# the shipped models, Mamba first and Diff-Mamba second: every command defaults to them
SHIPPED = ("mamba2-babi", "diffmamba2-babi")


def models_dir() -> Path:
    """Where the shipped models are: $DIFFMAMBA_MODELS if set; the package's own `_models/` in an
    installed wheel (setup.py copies the checkout's models/ there at build time); `models/` of this
    checkout (an editable install); else ./models."""
    env = os.environ.get("DIFFMAMBA_MODELS")
    if env:
        return Path(env)
    from importlib.resources import files

    packaged = files(__package__) / "_models"
    if packaged.is_dir():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parent.parent / "models"
    return repo if repo.is_dir() else Path.cwd() / "models"


def default_checkpoints() -> list[str]:
    paths = [models_dir() / name for name in SHIPPED]
    missing = [str(p) for p in paths if not (p / "config.json").is_file()]
    if missing:
        raise DiffMambaError(f"shipped model not found: {missing[0]} (run `make models`, or pass --ckpt)")
    return [str(p) for p in paths]


def display_path(path) -> str:
    """A checkpoint path as reports show it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


# where the CLI's models go (`--device`, `--dtype`); None: load_model's defaults
RUNTIME: dict = {"device": None, "dtype": None}


def load_models(ckpts: Sequence[str] | None) -> list:
    """Load each checkpoint (the shipped pair when None) -> [HookedMamba], labelled by directory name,
    on RUNTIME's device and dtype."""
    from .model import load_model

    paths = list(ckpts) if ckpts else default_checkpoints()
    models = [load_model(p, device=RUNTIME["device"], dtype=RUNTIME["dtype"]) for p in paths]
    labels = [Path(p).name or str(p) for p in paths]
    if len(set(labels)) != len(labels):
        labels = [str(p) for p in paths]
    for m, label in zip(models, labels):
        m.label = label
    return models


def tokenizer_of(model):
    if model.tokenizer is None:
        raise DiffMambaError(f"checkpoint {model.checkpoint_path} has no tokenizer; this command needs text input")
    return model.tokenizer


# -- SNR: the main job -------------------------------------------------------------------------
# the general defaults of snr / compare / report, and the presets that fix a protocol
DEFAULTS = {"data": "babi:qa1", "n": 200, "lens": "auto"}
PRESETS = {
    # the Diff-Mamba paper's Figure 6 protocol, as upstream's test_babilong_0k.py runs it: BABILong 0k,
    # qa1-qa20, the last 100 questions of each, shuffled with seed 42, tuned lens, plain mean of p
    "paper": {"data": "paper", "n": None, "lens": "tuned"},
}
JSON_SCHEMA_VERSION = 2


def resolve_protocol(preset: str | None, data: str | None, n: int | None, lens: str | None) -> dict:
    """The data spec, example count and lens of a run: a preset's, else the defaults, with explicit
    values filled in. A preset fixes its data and lens: giving others is an error (it would no longer
    be that protocol); --n may shorten it."""
    if preset is None:
        return {"data": data or DEFAULTS["data"], "n": DEFAULTS["n"] if n is None else n, "lens": lens or DEFAULTS["lens"],
                "preset": None}
    if preset not in PRESETS:
        raise DiffMambaError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    fixed = PRESETS[preset]
    for name, value in (("data", data), ("lens", lens)):
        if value is not None and value != fixed[name]:
            raise DiffMambaError(f"--preset {preset} fixes --{name} {fixed[name]}; drop --{name} {value} (or drop the preset)")
    return {"data": fixed["data"], "n": fixed["n"] if n is None else n, "lens": fixed["lens"], "preset": preset}


@dataclass
class SnrRun:
    """Per-layer needle probability / SNR / rank / distractor ratio for several models."""

    data: dict
    lens: str  # the lens asked for ("auto", "logit", "tuned")
    models: list = field(repr=False)
    prompts: list = field(repr=False)
    result: object = field(repr=False)  # analysis.compare.CompareResult
    lenses: dict = field(default_factory=dict)  # model label -> the lens it was read with ("logit" / "tuned")
    evaluation: "EvalRun | None" = field(default=None, repr=False)  # the full report's accuracy by length (--eval-data)

    @property
    def n_examples(self) -> int:
        return len(self.prompts)

    @property
    def lens_label(self) -> str:
        """The lens(es) used, for titles: "tuned", or "tuned / logit" when models differ."""
        return " / ".join(dict.fromkeys(self.lenses.values())) or self.lens

    @property
    def title(self) -> str:
        n = self.n_examples
        spec = self.data["spec"] if self.data.get("preset") is None else f"{self.data['spec']} (paper protocol)"
        return f"Needle probability per layer: {self.lens_label} lens, {spec}, n = {n}"

    def layer_table(self) -> pd.DataFrame:
        """Wide table, one row per model and layer (layer 0 = embeddings; paper_layer = the paper's
        Figure 6 index): for every measure its mean, CI and median (`{measure}_mean`, `_ci_low`,
        `_ci_high`, `_median`), and n / n_clusters of prob."""
        s = self.result.summary
        out = None
        for m in dict.fromkeys(s.measure):
            part = s[s.measure == m].set_index(["model", "layer"])
            cols = part[["mean", "ci_low", "ci_high", "median"]].add_prefix(f"{m}_")
            if out is None:
                out = part[["paper_layer"]].join(cols)
                out["n"], out["n_clusters"] = part["n"], part["n_clusters"]
            else:
                out = out.join(cols)
        out = out.reset_index()
        order = {label: i for i, label in enumerate(self.result.labels)}
        return out.sort_values(["model", "layer"], key=lambda c: c.map(order) if c.name == "model" else c).reset_index(drop=True)

    def lens_evaluation(self) -> pd.DataFrame:
        """The held-out evaluation saved with each model's tuned lens (`lens-train`): model, layer,
        paper_layer, KL of the logit and the tuned lens at all positions and at answer positions.
        Empty when no model was read with a tuned lens that carries one."""
        from .analysis.lens import TunedLens, resolve_lens

        frames = []
        for m in self.models:
            if self.lenses.get(m.label) != "tuned":
                continue
            lens = resolve_lens(m, "tuned")
            if isinstance(lens, TunedLens) and lens.evaluation:
                frames.append(pd.DataFrame(lens.evaluation).assign(model=m.label))
        if not frames:
            return pd.DataFrame()
        out = pd.concat(frames, ignore_index=True)
        return out[["model", *[c for c in out.columns if c != "model"]]]

    def summary_table(self) -> pd.DataFrame:
        """The columns the CLI prints: model, layer, paper_layer, prob (mean, CI), median prob, mean SNR
        (dB), mean rank, mean distractor log-ratio and n."""
        cols = ["model", "layer", "paper_layer", "prob_mean", "prob_ci_low", "prob_ci_high", "prob_median", "snr_db_mean",
                "rank_mean", "distractor_log_ratio_mean", "n_clusters"]
        return self.layer_table()[cols]

    def to_json(self) -> dict:
        """The JSON of `diffmamba-interp snr --json`, schema version `JSON_SCHEMA_VERSION` (README)."""
        table = self.layer_table()
        models = []
        for m in self.models:
            rows = table[table.model == m.label].drop(columns="model")
            models.append({"ckpt": display_path(m.checkpoint_path) if m.checkpoint_path else m.label, "label": m.label,
                           "arch": m.cfg.arch, "n_layers": m.cfg.n_layers, "lens": self.lenses.get(m.label, self.lens),
                           "layers": _records(rows)})
        return {"schema_version": JSON_SCHEMA_VERSION, "data": self.data, "lens": self.lens,
                "n_examples": self.n_examples, "models": models, "paired": _records(self.result.paired),
                "notes": list(self.result.notes)}

    @property
    def unit(self) -> str:
        """What the bootstrap resamples, as the warnings name it: stories or questions."""
        return "questions" if self.data.get("bootstrap") == "question" else "stories"

    def sample_warning(self) -> str | None:
        """A one-line warning when the statistics rest on fewer than `schemas.MIN_CLUSTERS` stories."""
        return few_clusters_warning(self.result.summary, self.unit)

    def per_example_table(self) -> pd.DataFrame:
        """One row per model × example × layer with every measure (`schemas.TARGET_COLUMNS`), the
        example's task, length (BABILong tokens, where the data has one) and answer: `--per-example`."""
        pe = self.result.per_example
        facts = pd.DataFrame({"example": range(len(self.prompts)), "task": [p.task for p in self.prompts],
                              "length": [p.meta.get("length") for p in self.prompts],
                              "answer": [p.answer for p in self.prompts]})
        out = pe.merge(facts, on="example", how="left", validate="many_to_one")
        first = ["model", "example", "story", "task", "length", "answer", "layer", "paper_layer"]
        return out[first + [c for c in out.columns if c not in first]]

    def accuracy_table(self) -> pd.DataFrame:
        """Task accuracy per model and task (`schemas.ACCURACY_COLUMNS`): the share of examples whose answer
        is rank 1 at the final layer (the model's argmax at the last position, as the final lens layer is
        the model's output), with a 95% Wilson interval at the effective sample size of the story
        clustering (`stats.proportion_interval`: questions of one story are not independent; `deff` is
        the design effect, 1 for independent questions). With several BABILong lengths the task label
        carries the length ("qa1 · 1k")."""
        from .data.babilong import format_length

        pe = self.per_example_table()
        final = pe[pe["layer"] == pe.groupby("model")["layer"].transform("max")].copy()
        lengths = final["length"].dropna().unique()
        if len(lengths) > 1:
            final["task"] = [f"{t} · {format_length(int(n))}" if n == n else t for t, n in zip(final["task"], final["length"])]
        final["correct"] = final["rank"] == 1
        rows = []
        for (model, task), g in final.groupby(["model", "task"], sort=False):
            stories = g["story"] if g["story"].notna().all() else None
            low, high, deff = proportion_interval(g["correct"].to_numpy(), None if stories is None else stories.to_numpy())
            rows.append({"model": model, "task": task, "n": len(g), "correct": int(g["correct"].sum()),
                         "accuracy": float(g["correct"].mean()), "ci_low": low, "ci_high": high, "deff": deff})
        out = pd.DataFrame(rows, columns=list(ACCURACY_COLUMNS))
        order = {label: i for i, label in enumerate(self.result.labels)}
        return out.sort_values(["model", "task"], key=lambda c: c.map(order) if c.name == "model" else c.map(_natural),
                               kind="stable").reset_index(drop=True)

    def report_tables(self, accuracy: pd.DataFrame, lambdas: pd.DataFrame) -> dict:
        """The tables at the end of the report: per-layer summary, accuracy, λ, the tuned lens's KL."""
        tables = {"per-layer summary": self.layer_table().round(4), "task accuracy (95% Wilson interval, story-clustered)": accuracy.round(4)}
        if len(lambdas):
            tables["λ per differential block"] = lambdas.round(4)
        kl = self.lens_evaluation()
        if len(kl):
            tables["tuned lens: held-out KL(final ‖ lens) per layer, nats, vs the logit lens"] = kl.round(4)
        return tables

    def write_report(self, path, *, branch: pd.DataFrame | None = None, attention=None, patching=None,
                     title: str | None = None, needle: pd.DataFrame | None = None, seeds: "SeedRun | None" = None,
                     evaluation: "EvalRun | None" = None) -> Path:
        """The HTML report of this run (`report.write_report`): accuracy, the per-layer measures, paired
        differences, λ, and whatever `branch` / `attention` / `needle` (`needle_summary`) / `patching` /
        `seeds` (a `SeedRun`: the seed-level sections) / `evaluation` (an `EvalRun`: the accuracy-by-length
        section, its tables with the others) are given; a warning box when the statistics rest on too few
        stories."""
        from .report import write_report

        accuracy, lambdas = self.accuracy_table(), lambda_table(self.models)
        tables = self.report_tables(accuracy, lambdas)
        if evaluation is not None:
            tables.update(evaluation.report_tables())
        if needle is not None and len(needle):
            tables[NEEDLE_TABLE] = needle_report_table(needle)
        meta = {"data": self.data["spec"], "lens": self.lens_label, "examples": self.n_examples,
                "bootstrap": self.data.get("bootstrap", "story"),
                "checkpoints": [display_path(m.checkpoint_path) if m.checkpoint_path else m.label for m in self.models]}
        if seeds is not None:
            tables.update(seeds.report_tables())
            meta["seed groups"] = {g: [display_path(c) for c in cs] for g, cs in seeds.ckpts.items()}
        if evaluation is not None:
            meta["accuracy by length"] = evaluation.description
        return write_report(
            path, title=title or self.title,
            summary=self.result.summary, paired=self.result.paired if len(self.result.paired) else None,
            branch=branch, attention=attention, patching=patching, accuracy=accuracy, lambdas=lambdas,
            needle=needle, seeds=seeds.result if seeds is not None else None,
            length_accuracy=evaluation.table if evaluation is not None else None,
            warnings=[w for w in (seeds.sample_warning(),) if w] if seeds is not None else (),
            tables=tables, unit=self.unit, meta=meta,
        )


def _natural(text) -> tuple:
    """A sort key that puts "qa2" before "qa10" and "1k" before "16k"."""
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.findall(r"\d+|\D+", str(text)))


def lambda_table(models) -> pd.DataFrame:
    """λ of every differential block of each model (`schemas.LAMBDA_COLUMNS`): block index i (the paper's
    layer i), λ (`Differential.lam()`, what `hook_lambda` sees) and λ_init. Plain models, and Diff-S6
    layers of the Mamba-1 form (no λ: a plain difference), add no rows."""
    import torch

    from .analysis.attention import differential_of

    rows = []
    for m in models:
        for i, block in enumerate(m.blocks):
            found = differential_of(block, i)
            if found is not None and found[1].lambda_form is not None:
                with torch.no_grad():
                    lam = float(found[1].lam())
                rows.append((m.label, i, lam, float(found[1].lambda_init)))
    return pd.DataFrame(rows, columns=list(LAMBDA_COLUMNS))


PER_EXAMPLE_FORMATS = {".csv": "CSV", ".parquet": "Parquet"}


def check_table_path(path, what: str = "--per-example") -> str:
    """The format of a table file by its extension ("CSV" or "Parquet"), checked before any work: another
    extension, or Parquet without pyarrow, is a one-line error."""
    import importlib.util

    fmt = PER_EXAMPLE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DiffMambaError(f"{what} {path}: give a file ending in .csv or .parquet")
    if fmt == "Parquet" and importlib.util.find_spec("pyarrow") is None:
        raise DiffMambaError(f"{what} {path}: Parquet needs pyarrow (pip install pyarrow), or write .csv")
    return fmt


def write_table(path, frame: pd.DataFrame, what: str = "--per-example") -> Path:
    """`frame` as CSV or Parquet (by extension, `check_table_path`), written atomically (files.write_atomic)."""
    from .files import write_atomic

    if check_table_path(path, what) == "Parquet":
        return write_atomic(path, write=lambda tmp: frame.to_parquet(tmp, index=False), what=what)
    return write_atomic(path, frame.to_csv(index=False), what=what)


def _records(df: pd.DataFrame) -> list[dict]:
    """DataFrame -> JSON-safe records (NaN / <NA> -> None, numpy scalars -> Python)."""
    def clean(v):
        if v is pd.NA or (isinstance(v, float) and v != v):
            return None
        return v.item() if hasattr(v, "item") else v

    return [{k: clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def load_prompts(data: str, n: int | None, seed: int = 0, tokenizer=None, filler: str = "books") -> list:
    from .data import load_data

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise DiffMambaError(f"--n must be a positive number of examples, got {n}")
    prompts = load_data(data, n=n, seed=seed, tokenizer=tokenizer, filler=filler)
    if not prompts:
        raise DiffMambaError(f"data spec {data!r} gave no examples")
    return prompts


def run_snr(ckpts: Sequence[str] | None = None, data: str | None = None, n: int | None = None, lens: str | None = None,
            seed: int = 0, n_boot: int = 1000, models: list | None = None, progress: bool = True,
            preset: str | None = None, bootstrap: str = "story", filler: str = "books",
            chunk_size: int | None = None, seeds: "SeedRun | None" = None) -> SnrRun:
    """The main job: each model's per-layer needle probability on `data`, with CIs and paired diffs.

    data / n / lens default to `DEFAULTS` (lens "auto": the tuned lens where a checkpoint has one);
    preset="paper" runs the paper's protocol (`PRESETS`). bootstrap: "story" or "question".
    chunk_size: long prompts run in pieces of this many tokens, state carried (default 2048).
    seeds: a `run_seed_snr` result of the same protocol, seed and filler that holds these checkpoints:
    their rows are taken from it, not computed again (`report --all-seeds`).
    """
    from .analysis.compare import compare
    from .analysis.lens import LENSES, lens_name, resolve_lens

    protocol = resolve_protocol(preset, data, n, lens)
    if protocol["lens"] not in LENSES:
        raise DiffMambaError(f"unknown lens {protocol['lens']!r}; expected one of {', '.join(LENSES)}")
    models = models or load_models(ckpts)
    info = {"spec": protocol["data"], "n": protocol["n"], "seed": seed, "preset": protocol["preset"],
            "bootstrap": bootstrap, "filler": filler}
    known = seeds.known_rows(models, info, protocol["lens"]) if seeds is not None else {}
    prompts = seeds.prompts if known else load_prompts(protocol["data"], protocol["n"], seed,
                                                       tokenizer=models[0].tokenizer, filler=filler)
    lenses = [resolve_lens(m, protocol["lens"]) for m in models]
    result = compare(models, prompts, lens=lenses, labels=[m.label for m in models], n_boot=n_boot, seed=seed,
                     progress=progress, bootstrap=bootstrap, chunk_size=chunk_size, known=known)
    return SnrRun(info, protocol["lens"], models, prompts, result, {m.label: lens_name(ln) for m, ln in zip(models, lenses)})


# -- one prompt --------------------------------------------------------------------------------
def lens_table(model, prompt: str, answer: str, lens: str = "auto", top_k: int = 5, chunk_size: int | None = None) -> pd.DataFrame:
    """Per layer: target probability and rank, and the lens's top tokens at the last position
    (`.attrs["lens"]` names the lens used)."""
    import warnings

    from .analysis.inputs import UnknownTokenWarning
    from .analysis.lens import lens_name, resolve_lens
    from .analysis.snr import target_probs

    tok = tokenizer_of(model)
    n_tokens = len(tok.encode(" " + answer, add_special_tokens=False))
    if n_tokens != 1:
        raise DiffMambaError(f"answer {answer!r} is {n_tokens} tokens for this tokenizer; the lens reads one token, give one word")
    lens_obj = resolve_lens(model, lens)
    rows = target_probs(model, [prompt], [answer], lens=lens_obj, progress=False, chunk_size=chunk_size)
    with warnings.catch_warnings():  # target_probs has warned of unknown tokens in the prompt: once is enough
        warnings.simplefilter("ignore", UnknownTokenWarning)
        ids = model.to_tokens(prompt)
    logp = lens_obj.log_probs(model, ids, positions=[-1], chunk_size=chunk_size)[:, 0, 0]  # [layers, vocab]
    top = logp.topk(top_k, dim=-1)
    rows["top_tokens"] = [
        ", ".join(f"{t} ({p:.2f})" for t, p in zip(tok.convert_ids_to_tokens(i.tolist()), v.exp().tolist()))
        for i, v in zip(top.indices, top.values)
    ]
    table = rows[["layer", "paper_layer", "target", "prob", "rank", "snr_db", "top_tokens"]]
    table.attrs["lens"] = lens_name(lens_obj)
    return table


def attention_entry(model, prompt: str, layer: int, branch: int | None = None, kind: str = "s6",
                    reduce: str = "mean", view: str = "full", positions: str | None = None, max_side: int | None = None,
                    answer: str | None = None, needles: Sequence[str] = ()) -> dict:
    """Implicit attention of one layer for the report: each branch and, for a differential layer, the
    differential summary (or the single map of a plain layer); kind "output" the output-space
    operator's norm. view "full" (maps over positions `positions` "a:b", averaged over blocks above
    `max_side` a side) or "row" (the answer row of every map); see `attention_views.attention_view`."""
    from .attention_views import MAX_SIDE, attention_view

    return attention_view(model, prompt, layer, branch, kind, reduce, view, positions,
                          MAX_SIDE if max_side is None else max_side, answer, needles)


def branch_table(models, prompts, n: int = 50, progress: bool = True, chunk_size: int | None = None) -> pd.DataFrame:
    """Mean direct logit contribution of mixer_1, −λ·mixer_2 and each block, per model and layer."""
    from .analysis.branch_lens import branch_lens

    frames = []
    for m in models:
        subset = prompts[:n]  # texts and answers: branch_lens batches them by length
        df = branch_lens(m, [p.prompt for p in subset], [p.answer for p in subset], progress=progress, chunk_size=chunk_size)
        frames.append(df.groupby(["layer", "component"], as_index=False)["value"].mean().assign(model=m.label))
    return pd.concat(frames, ignore_index=True)[["model", "layer", "component", "value"]]


REPORT_ATTENTION_SIDE = 96  # cells a side of the report's attention maps (longer prompts are averaged over blocks)
NEEDLE_EXAMPLES = 50  # examples behind the report's attention-to-the-needle section (the first ones)
NEEDLE_TABLE = "attention to the needle: share of each block's answer row on the supporting facts"


def needle_summary(models, prompts, n: int = NEEDLE_EXAMPLES, seed: int = 0, progress: bool = True) -> pd.DataFrame | None:
    """The report's attention to the needle: `analysis.needle_attention.needle_attention` of each model
    over the first `n` prompts (block maps, mean over channels, CIs over stories), its summary rows of
    the maps the report draws (`report.needle.NEEDLE_MAPS`: a plain block's map, a differential block's
    branches and differential map). None, with a warning, when the prompts do not mark their
    supporting facts (e.g. jsonl data)."""
    import warnings

    from .analysis.needle_attention import needle_attention
    from .report.needle import NEEDLE_MAPS

    try:
        res = needle_attention(models, list(prompts)[:n], seed=seed, labels=[m.label for m in models], progress=progress)
    except DiffMambaError as e:
        warnings.warn(f"no attention-to-the-needle section ({e})", stacklevel=2)
        return None
    s = res.summary
    return s[s["map"].isin(NEEDLE_MAPS)].reset_index(drop=True)


def needle_report_table(needle: pd.DataFrame) -> pd.DataFrame:
    """`needle_summary` as the report's table: block index i (= the paper's layer i) in place of layer."""
    return needle.rename(columns={"layer": "block", "mean": "share", "ratio": "share / baseline"})


def _unknown_tokens_once(fn):
    """A job that runs several analyses over the same prompts: one warning of their unknown tokens
    (`analysis.inputs.unknown_tokens_once`), not one per analysis and model."""
    import functools

    @functools.wraps(fn)
    def job(*args, **kwargs):
        from .analysis.inputs import unknown_tokens_once

        with unknown_tokens_once():
            return fn(*args, **kwargs)

    return job


@_unknown_tokens_once
def full_report(ckpts: Sequence[str] | None = None, data: str | None = None, n: int | None = None,
                lens: str | None = None, out: str | Path = "reports/report.html", example: int = 0,
                layer: int | None = None, kind: str = "s6", seed: int = 0, progress: bool = True,
                preset: str | None = None, bootstrap: str = "story", filler: str = "books",
                chunk_size: int | None = None, seeds: "SeedRun | None" = None,
                eval_data: str | Sequence[str] | None = None, eval_n: int | None = None) -> tuple[SnrRun, Path]:
    """Everything in one HTML report: task accuracy, SNR per layer, paired differences, λ, branch lens,
    implicit attention of one example (the first differential layer by default; the bounded full view
    of `attention_entry`, at most `REPORT_ATTENTION_SIDE` cells a side) for each model, the attention
    to the needle (`needle_summary`), residual patching of that example into its swap corruption
    (`swap_patching`), with `seeds` (a `run_seed_snr` result) the seed-level sections, tables.

    eval_data (e.g. ``babilong:qa1:0k,1k,2k,4k``; several specs or ``babilong:qa1,qa2:0k,1k`` as `eval`):
    the accuracy-by-length section, `run_eval` of the report's models on `eval_n` questions per task and
    length (default `REPORT_EVAL_N`) with the report's seed, filler and chunk size, kept as
    ``run.evaluation``; checked before any work. None: no such section."""
    specs, eval_n = report_eval_options(eval_data, eval_n)
    run = run_snr(ckpts, data, n, lens, seed=seed, progress=progress, preset=preset, bootstrap=bootstrap, filler=filler,
                  chunk_size=chunk_size, seeds=seeds)
    if isinstance(example, bool) or not isinstance(example, int) or not 0 <= example < len(run.prompts):
        raise DiffMambaError(f"example {example} is out of range: the data has {len(run.prompts)} examples (0..{len(run.prompts) - 1})")
    if specs is not None:
        run.evaluation = run_eval(data=specs, n=eval_n, seed=seed, filler=filler, chunk_size=chunk_size,
                                  models=run.models, progress=progress)
    branch = branch_table(run.models, run.prompts, progress=progress, chunk_size=chunk_size)
    prompt = run.prompts[example].prompt
    entries = []
    for m in run.models:
        k = layer if layer is not None else (m.cfg.diff_layer_indices[0] if m.cfg.diff_layer_indices else 0)
        entries.append(attention_entry(m, prompt, k, kind=kind, max_side=REPORT_ATTENTION_SIDE))
    needle = needle_summary(run.models, run.prompts, seed=seed, progress=progress)
    patching = swap_patching(run.models, run.prompts[example], chunk_size=chunk_size)
    return run, run.write_report(out, branch=branch, attention=entries, patching=patching, needle=needle, seeds=seeds,
                                 evaluation=run.evaluation, title="diffmamba-interp report")


SWAP_EXACT_MAX = 512  # tokens up to which the report's patching is exact over every position (else attribution)


def swap_corruption(prompt) -> tuple[str, str, str] | None:
    """A bAbI-style corrupted prompt: the answer and its first other candidate swapped everywhere in the
    text (so the facts point to the other answer) -> (corrupted text, answer, wrong answer); None
    without a candidate."""
    import re

    others = [c for c in getattr(prompt, "candidates", ()) if c != prompt.answer]
    if not others:
        return None
    a, b = prompt.answer, others[0]
    swapped = re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", lambda m: b if m.group(0) == a else a, prompt.prompt)
    return swapped, a, b


def swap_patching(models, prompt, chunk_size: int | None = None) -> list:
    """Residual patching of one example for each model, from the prompt into its swap corruption
    (`swap_corruption`), metric the logit difference answer − wrong: exact over every position up to
    SWAP_EXACT_MAX tokens, the attribution estimate beyond. Models whose tokens of the two prompts
    differ in length are left out (with a warning), as is an example without a candidate."""
    import warnings

    from .analysis.patching import patch

    pair = swap_corruption(prompt)
    if pair is None:
        return []
    corrupt, a, b = pair
    out = []
    for m in models:
        L = len(tokenizer_of(m).encode(prompt.prompt, add_special_tokens=False))
        try:
            res = patch(m, prompt.prompt, corrupt, answer=a, wrong=b, what="resid", progress=False,
                        method="exact" if L <= SWAP_EXACT_MAX else "attribution", chunk_size=chunk_size)
        except DiffMambaError as e:
            warnings.warn(f"{m.label}: no patching section ({e})", stacklevel=2)
            continue
        res.model = f"{m.label}: {a!r} and {b!r} swapped in the story"
        out.append(res)
    return out


# -- tuned lens for any checkpoint --------------------------------------------------------------
def lens_train(ckpt: str, text: str | None = None, data: str | None = None, out: str | None = None,
               steps: int = 250, seed: int = 0, batch: int = 8, seq_len: int = 128, optimizer: str = "sgd",
               lr: float | None = None, eval_data: str | None = "babi:qa1", eval_n: int = 100, force: bool = False,
               progress: bool = True):
    """Fit a tuned lens for one checkpoint (Belrose et al.'s recipe by default) on general text (the
    shipped books), a text file (`text`) or a data spec's prompts + answers (`data`), evaluate it
    (held-out text at every position; `eval_data` at the answer position) and save it to `out`
    (default: the checkpoint directory). Refuses to replace an existing lens unless `force`.
    Returns (lens, evaluation DataFrame, output directory)."""
    from .analysis.lens import LENS_CONFIG, LENS_WEIGHTS
    from .analysis.lens_training import fit_lens
    from .data.books import read_text_file
    from .model import load_model

    if text is not None and data is not None:
        raise DiffMambaError("give --text or --data, not both")
    model = load_model(ckpt)
    target = Path(out) if out is not None else Path(model.checkpoint_path)
    existing = [n for n in (LENS_CONFIG, LENS_WEIGHTS) if (target / n).exists()]
    if existing and not force:
        raise DiffMambaError(f"{target} already has a tuned lens ({', '.join(existing)}); pass --force to replace it")
    corpus = None
    if text is not None:
        corpus = read_text_file(Path(text), "training text")
    elif data is not None:
        corpus = "\n\n".join(f"{p.prompt} {p.answer}" for p in load_prompts(data, None, seed, tokenizer=model.tokenizer))
    prompts = load_prompts(eval_data, eval_n, seed, tokenizer=model.tokenizer) if eval_data else None
    lens = fit_lens(model, corpus, steps=steps, seed=seed, batch=batch, seq_len=seq_len, optimizer=optimizer, lr=lr,
                    eval_prompts=prompts, progress=progress)
    lens.save(target)
    return lens, pd.DataFrame(lens.evaluation), target


# -- several training seeds per architecture ------------------------------------------------------
def expand_checkpoints(patterns: Sequence[str], option: str) -> list[str]:
    """Checkpoint arguments with shell-style globs expanded (sorted); a pattern that matches nothing is an error."""
    import glob

    out = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = sorted(p for p in glob.glob(pattern) if Path(p).is_dir())
            if not found:
                raise DiffMambaError(f"{option} {pattern}: no checkpoint directory matches")
            out.extend(found)
        else:
            out.append(pattern)
    return out


def shipped_seed_checkpoints() -> dict[str, list[str]]:
    """`--all-seeds`: for each name of SHIPPED, every shipped training seed in `models_dir()`: `<name>`
    (seed 0) and each `<name>-seed<k>` directory with a config.json, in the order of k."""
    import glob
    import re

    root, out = models_dir(), {}
    for name in SHIPPED:
        found = [(0, root / name)] if (root / name / "config.json").is_file() else []
        for path in glob.glob(os.path.join(glob.escape(str(root)), glob.escape(name) + "-seed*")):
            m = re.fullmatch(rf"{re.escape(name)}-seed(\d+)", Path(path).name)
            if m and (Path(path) / "config.json").is_file():
                found.append((int(m.group(1)), Path(path)))
        if not found:
            raise DiffMambaError(f"--all-seeds: no {name} nor {name}-seed<k> checkpoint in {root} (run `make models`, "
                                 "or pass --ckpt-a/--ckpt-b)")
        out[name] = [str(p) for _, p in sorted(found)]
    return out


@dataclass
class SeedRun:
    """Seed-level per-layer statistics of two architectures (groups a and b), each with several checkpoints."""

    data: dict
    lens: str
    prompts: list = field(repr=False)
    result: object = field(repr=False)  # analysis.seeds.SeedCompareResult
    ckpts: dict = field(default_factory=dict)  # group -> checkpoint paths

    def known_rows(self, models: Sequence, data: dict, lens: str) -> dict:
        """Model label -> its `target_probs` rows in this run, for those of `models` (loaded checkpoints)
        that it ran on the same data (spec, n, seed, filler) and lens; {} when the run differs."""
        if any(self.data.get(k) != data[k] for k in ("spec", "n", "seed", "filler")) or lens != self.lens:
            return {}
        labels = {str(Path(p).resolve()): label for g, paths in self.ckpts.items()
                  for p, label in zip(paths, self.result.groups[g])}
        rows = self.result.per_example
        out = {}
        for m in models:
            label = labels.get(str(Path(m.checkpoint_path).resolve())) if m.checkpoint_path else None
            if label is not None:
                out[m.label] = rows[rows.model == label].drop(columns=["group", "model"]).reset_index(drop=True)
        return out

    @property
    def title(self) -> str:
        sizes = ", ".join(f"{g}: {len(c)} seed{'s' if len(c) != 1 else ''}" for g, c in self.ckpts.items())
        return f"Needle probability per layer across training seeds ({sizes}): {self.lens} lens, {self.data['spec']}, n = {len(self.prompts)}"

    def summary_table(self, measure: str = "prob") -> pd.DataFrame:
        s = self.result.summary
        return s[s.measure == measure].drop(columns="measure").reset_index(drop=True)

    def paired_table(self, measure: str = "prob") -> pd.DataFrame:
        p = self.result.paired
        return p[p.measure == measure].drop(columns="measure").reset_index(drop=True)

    @property
    def unit(self) -> str:
        return "questions" if self.data.get("bootstrap") == "question" else "stories"

    def sample_warning(self) -> str | None:
        """A one-line warning when the statistics rest on fewer than `schemas.MIN_CLUSTERS` stories."""
        return few_clusters_warning(self.result.summary, self.unit)

    def per_seed_table(self, measure: str = "prob") -> pd.DataFrame:
        """Each checkpoint's mean of `measure` per layer (rows: layer and paper_layer; columns: checkpoints)."""
        p = self.result.per_seed
        p = p[p.measure == measure]
        wide = p.pivot(index="layer", columns="model", values="mean")[list(dict.fromkeys(p["model"]))]
        short = [str(c).split("/", 1)[-1] for c in wide.columns]  # "group/directory" -> "directory" when unique
        if len(set(short)) == len(short):
            wide.columns = short
        wide.insert(0, "paper_layer", p.drop_duplicates("layer").set_index("layer")["paper_layer"])
        wide.columns.name = None
        return wide.reset_index()

    def report_tables(self) -> dict:
        """The seed-level tables of the report (needle probability; --json has every measure), unrounded:
        the page prints 4 significant digits, so a tiny non-zero interval does not read as 0."""
        return {"across seeds: needle probability per architecture (seed-level mean and 95% interval)": self.summary_table(),
                "across seeds: needle probability per checkpoint": self.per_seed_table(),
                "across seeds: difference in needle probability (b − a)": self.paired_table()}

    def write_report(self, path, title: str | None = None) -> Path:
        """`snr --ckpt-a ... --ckpt-b ... --out`: the seed-level sections (`report.seeds`) and tables on
        one self-contained page, a warning box when the statistics rest on too few stories."""
        from .report import write_report

        return write_report(
            path, title=title or self.title, seeds=self.result, tables=self.report_tables(), unit=self.unit,
            warnings=[w for w in (self.sample_warning(),) if w],
            meta={"data": self.data["spec"], "lens": self.lens, "examples": len(self.prompts),
                  "bootstrap": self.data.get("bootstrap", "story"),
                  "seed groups": {g: [display_path(c) for c in cs] for g, cs in self.ckpts.items()}})

    def to_json(self) -> dict:
        groups = [{"name": g, "ckpts": [display_path(c) for c in self.ckpts[g]],
                   "rows": _records(self.result.summary[self.result.summary.group == g].drop(columns="group"))}
                  for g in self.ckpts]
        return {"schema_version": JSON_SCHEMA_VERSION, "data": self.data, "lens": self.lens,
                "n_examples": len(self.prompts), "groups": groups, "paired": _records(self.result.paired),
                "notes": list(self.result.notes)}


def run_seed_snr(ckpts_a: Sequence[str], ckpts_b: Sequence[str], data: str | None = None, n: int | None = None,
                 lens: str | None = None, seed: int = 0, n_boot: int = 1000, progress: bool = True,
                 preset: str | None = None, bootstrap: str = "story", filler: str = "books",
                 chunk_size: int | None = None) -> SeedRun:
    """`snr --ckpt-a A1 --ckpt-a A2 ... --ckpt-b B1 ...`: every checkpoint on the same prompts, seed-level
    summaries per group and the paired comparison b − a across seeds (`analysis.seeds.compare_seeds`).
    Groups are named after their checkpoints' architecture (a / b when both share one)."""
    from .analysis.seeds import compare_seeds

    protocol = resolve_protocol(preset, data, n, lens)
    paths = {"a": expand_checkpoints(ckpts_a, "--ckpt-a"), "b": expand_checkpoints(ckpts_b, "--ckpt-b")}
    if not paths["a"] or not paths["b"]:
        raise DiffMambaError("give checkpoints for both groups: --ckpt-a ... and --ckpt-b ...")
    models = {g: load_models(p) for g, p in paths.items()}
    archs = {g: {m.cfg.arch for m in ms} for g, ms in models.items()}
    names = {g: (next(iter(a)) if len(a) == 1 else g) for g, a in archs.items()}
    if names["a"] == names["b"]:
        names = {"a": "a", "b": "b"}
    prompts = load_prompts(protocol["data"], protocol["n"], seed, tokenizer=models["a"][0].tokenizer, filler=filler)
    result = compare_seeds({names[g]: models[g] for g in ("a", "b")}, prompts, lens=protocol["lens"], n_boot=n_boot,
                           seed=seed, progress=progress, bootstrap=bootstrap, chunk_size=chunk_size)
    info = {"spec": protocol["data"], "n": protocol["n"], "seed": seed, "preset": protocol["preset"],
            "bootstrap": bootstrap, "filler": filler}
    return SeedRun(info, protocol["lens"], prompts, result, {names[g]: paths[g] for g in ("a", "b")})


# -- accuracy by context length (`eval`) ------------------------------------------------------------
EVAL_DEFAULTS = {"data": ("babilong:qa1:0k,1k,2k,4k",), "n": 100}  # upstream scores 100 questions per task and length
EVAL_SCHEMA_VERSION = 1
REPORT_EVAL_N = 50  # `report --eval-data`: questions per task and length of the accuracy-by-length section
ACCURACY_BY_LENGTH_TABLE = "accuracy by context length: model, task, length (95% Wilson intervals, story-clustered)"


def eval_specs(data: str | Sequence[str] | None) -> list[str]:
    """The data specs of an `eval` run, each checked (`data.parse_data_spec`) before any work: a spec, or
    several; a task list such as ``babilong:qa1,qa2:0k,1k`` becomes one spec per task."""
    from .analysis.accuracy import expand_task_lists
    from .data import parse_data_spec

    given = [data] if isinstance(data, str) else list(data or EVAL_DEFAULTS["data"])
    specs = [s for spec in given for s in expand_task_lists(spec)]
    for s in specs:
        parse_data_spec(s)
    return list(dict.fromkeys(specs))


def report_eval_options(eval_data: str | Sequence[str] | None, eval_n: int | None) -> tuple[list[str] | None, int]:
    """`report --eval-data SPEC --eval-n N`, checked before any work -> (the specs, `eval_specs`; None for
    no accuracy-by-length section, n: default `REPORT_EVAL_N`). --eval-n without --eval-data is an error."""
    given = [eval_data] if isinstance(eval_data, str) else list(eval_data or [])
    if not given:
        if eval_n is not None:
            raise DiffMambaError("--eval-n is the size of the accuracy-by-length section: give --eval-data SPEC too "
                                 "(e.g. --eval-data babilong:qa1:0k,1k,2k,4k)")
        return None, REPORT_EVAL_N
    n = REPORT_EVAL_N if eval_n is None else eval_n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DiffMambaError(f"--eval-n must be a whole number >= 1, got {n!r}")
    return eval_specs(given), n


@dataclass
class EvalRun:
    """Accuracy by task and context length of several models (`analysis.accuracy.accuracy_by_length`)."""

    data: dict
    models: list = field(repr=False)
    prompts: list = field(repr=False)
    result: object = field(repr=False)  # analysis.accuracy.AccuracyResult

    @property
    def table(self) -> pd.DataFrame:
        return self.result.table

    @property
    def title(self) -> str:
        return (f"Accuracy by context length: {', '.join(self.data['specs'])}, n = {self.data['n']} questions per "
                f"task and length ({len(self.prompts)} prompts)")

    def print_table(self) -> pd.DataFrame:
        """The table as the CLI prints it: lengths as labels ("4k")."""
        from .report.accuracy import length_label

        return self.table.assign(length=[length_label(x) for x in self.table["length"]])

    @property
    def description(self) -> str:
        """The run in one line, for a report's meta block: its specs, questions, filler and decoding."""
        return (f"{', '.join(self.data['specs'])}, {self.data['n']} questions per task and length, "
                f"{self.data['filler']} filler, at most {self.data['max_new_tokens']} new tokens")

    def report_tables(self) -> dict:
        """The full report's tables of this run (`SnrRun.write_report(evaluation=...)`): the accuracy table
        (95% intervals) and, with several models, the ratio of each to the first."""
        tables = {ACCURACY_BY_LENGTH_TABLE: self.table.round(4)}
        ratio = self.ratio_tables()
        if len(ratio):
            tables["accuracy by context length: ratio to the first model"] = ratio.round(4)
        return tables

    def ratio_tables(self) -> pd.DataFrame:
        """Every other model over the first, per scorer that was run (`analysis.accuracy.accuracy_ratio`)."""
        from .analysis.accuracy import SCORERS, accuracy_ratio

        labels = self.result.labels
        frames = [accuracy_ratio(self.table, labels[0], b, s).assign(scorer=s) for s in SCORERS
                  if self.table[f"accuracy_{s}"].notna().any() for b in labels[1:]]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def to_json(self) -> dict:
        models = [{"ckpt": display_path(m.checkpoint_path) if m.checkpoint_path else label, "label": label,
                   "arch": m.cfg.arch} for m, label in zip(self.models, self.result.labels)]
        return {"schema_version": EVAL_SCHEMA_VERSION, "data": self.data, "models": models,
                "accuracy": _records(self.table), "ratio": _records(self.ratio_tables()),
                "examples": _records(self.result.per_example)}

    def write_report(self, path) -> Path:
        from .report.accuracy import write_accuracy_report

        ratio = self.ratio_tables()
        tables = {"ratio to the first model": ratio.round(4)} if len(ratio) else None
        meta = {"data": self.data["specs"], "questions per task and length": self.data["n"], "seed": self.data["seed"],
                "filler": self.data["filler"], "max new tokens": self.data["max_new_tokens"],
                "checkpoints": [display_path(m.checkpoint_path) if m.checkpoint_path else label
                                for m, label in zip(self.models, self.result.labels)]}
        return write_accuracy_report(path, self.table, title=self.title, meta=meta, tables=tables)


def run_eval(ckpts: Sequence[str] | None = None, data: str | Sequence[str] | None = None, n: int | None = None,
             seed: int = 0, filler: str = "books", batch_size: int = 8, max_new_tokens: int | None = None,
             chunk_size: int | None = None, models: list | None = None, progress: bool = True) -> EvalRun:
    """`eval`: each model's accuracy by task and context length on `data` (default
    ``babilong:qa1:0k,1k,2k,4k``; several specs, or ``babilong:qa1,qa2:0k,1k``), n questions per task
    (default 100, the same questions at every length), scored by argmax at the last position and by
    greedy generation of at most `max_new_tokens` (default 20, upstream's; 0: argmax only). Every
    input is checked before any model runs."""
    from .analysis.accuracy import MAX_NEW_TOKENS, _check_words, accuracy_by_length
    from .recurrent import check_chunk_size

    specs = eval_specs(data)
    n = EVAL_DEFAULTS["n"] if n is None else n
    for name, value, low in (("--n", n, 1), ("--batch-size", batch_size, 1),
                             ("--max-new-tokens", MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DiffMambaError(f"{name} must be a whole number >= {low}, got {value!r}")
    max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    models = models or load_models(ckpts)
    prompts = [p for s in specs for p in load_prompts(s, n, seed, tokenizer=models[0].tokenizer, filler=filler)]
    _check_words(models, prompts)  # an answer or candidate outside a vocabulary: one line, before any model runs
    result = accuracy_by_length(models, prompts, labels=[getattr(m, "label", None) or m.cfg.arch for m in models],
                                batch_size=batch_size, max_new_tokens=max_new_tokens, chunk_size=chunk_size,
                                progress=progress)
    info = {"specs": specs, "n": n, "seed": seed, "filler": filler, "max_new_tokens": max_new_tokens}
    return EvalRun(info, models, prompts, result)
