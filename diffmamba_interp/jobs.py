"""The toolkit's main jobs as Python functions: the CLI commands and the notebooks call these.

checkpoint -> model -> analysis -> DataFrame -> JSON / HTML report. Nothing here prints; the CLI
formats what these return.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from .errors import DiffMambaError

# the shipped models, Mamba first and Diff-Mamba second: every command defaults to them
SHIPPED = ("mamba2-babi", "diffmamba2-babi")


def models_dir() -> Path:
    """`models/` of this checkout ($DIFFMAMBA_MODELS overrides), else ./models."""
    env = os.environ.get("DIFFMAMBA_MODELS")
    if env:
        return Path(env)
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


def load_models(ckpts: Sequence[str] | None) -> list:
    """Load each checkpoint (the shipped pair when None) -> [HookedMamba], labelled by directory name."""
    from .model import load_model

    paths = list(ckpts) if ckpts else default_checkpoints()
    models = [load_model(p) for p in paths]
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
@dataclass
class SnrRun:
    """Per-layer needle probability / SNR / rank / distractor ratio for several models."""

    data: dict
    lens: str
    models: list = field(repr=False)
    prompts: list = field(repr=False)
    result: object = field(repr=False)  # analysis.compare.CompareResult

    @property
    def n_examples(self) -> int:
        return len(self.prompts)

    def layer_table(self) -> pd.DataFrame:
        """Wide table: model, layer, prob_mean, prob_ci_low, prob_ci_high, prob_median, snr_db_mean,
        rank_mean, distractor_ratio_mean (one row per model and layer, layer 0 = embeddings)."""
        s = self.result.summary
        prob = s[s.measure == "prob"].set_index(["model", "layer"])
        out = pd.DataFrame({
            "prob_mean": prob["mean"], "prob_ci_low": prob["ci_low"], "prob_ci_high": prob["ci_high"],
            "prob_median": prob["median"],
        })
        for m in ("snr_db", "rank", "distractor_ratio"):
            out[f"{m}_mean"] = s[s.measure == m].set_index(["model", "layer"])["mean"]
        out = out.reset_index()
        order = {label: i for i, label in enumerate(self.result.labels)}
        return out.sort_values(["model", "layer"], key=lambda c: c.map(order) if c.name == "model" else c).reset_index(drop=True)

    def to_json(self) -> dict:
        """The stable JSON of `diffmamba-interp snr --json` (documented in the README)."""
        table = self.layer_table()
        models = []
        for m in self.models:
            rows = table[table.model == m.label].drop(columns="model")
            models.append({"ckpt": display_path(m.checkpoint_path) if m.checkpoint_path else m.label, "label": m.label, "arch": m.cfg.arch,
                           "n_layers": m.cfg.n_layers, "layers": _records(rows)})
        return {"data": self.data, "lens": self.lens, "n_examples": self.n_examples, "models": models,
                "paired": _records(self.result.paired)}

    def write_report(self, path, *, branch: pd.DataFrame | None = None, attention=None, title: str | None = None) -> Path:
        from .report import write_report

        table = self.layer_table()
        return write_report(
            path, title=title or f"Needle probability per layer: {' vs '.join(self.result.labels)}",
            summary=self.result.summary, paired=self.result.paired if len(self.result.paired) else None,
            branch=branch, attention=attention, tables={"per-layer summary": table.round(4)},
            meta={"data": self.data["spec"], "lens": self.lens, "examples": self.n_examples,
                  "checkpoints": [display_path(m.checkpoint_path) if m.checkpoint_path else m.label for m in self.models]},
        )


def _records(df: pd.DataFrame) -> list[dict]:
    """DataFrame -> JSON-safe records (NaN -> None, numpy scalars -> Python)."""
    return [{k: (None if isinstance(v, float) and v != v else (v.item() if hasattr(v, "item") else v))
             for k, v in row.items()} for row in df.to_dict(orient="records")]


def load_prompts(data: str, n: int | None, seed: int = 0, tokenizer=None) -> list:
    from .data import load_data

    if n is not None and n <= 0:
        raise DiffMambaError(f"--n must be a positive number of examples, got {n}")
    prompts = load_data(data, n=n, seed=seed, tokenizer=tokenizer)
    if not prompts:
        raise DiffMambaError(f"data spec {data!r} gave no examples")
    return prompts


def run_snr(ckpts: Sequence[str] | None = None, data: str = "babi:qa1", n: int | None = 200, lens: str = "logit",
            seed: int = 0, n_boot: int = 1000, models: list | None = None, progress: bool = True) -> SnrRun:
    """The main job: each model's per-layer needle probability on `data`, with CIs and paired diffs."""
    from .analysis.compare import compare
    from .analysis.lens import LENSES

    if lens not in LENSES:
        raise DiffMambaError(f"unknown lens {lens!r}; expected one of {', '.join(LENSES)}")
    models = models or load_models(ckpts)
    prompts = load_prompts(data, n, seed, tokenizer=models[0].tokenizer)
    result = compare(models, prompts, lens=lens, labels=[m.label for m in models], n_boot=n_boot, seed=seed,
                     progress=progress)
    return SnrRun({"spec": data, "n": n, "seed": seed}, lens, models, prompts, result)


# -- one prompt --------------------------------------------------------------------------------
def lens_table(model, prompt: str, answer: str, lens: str = "logit", top_k: int = 5) -> pd.DataFrame:
    """Per layer: target probability and rank, and the lens's top tokens at the last position."""
    from .analysis.lens import resolve_lens
    from .analysis.snr import target_probs

    tok = tokenizer_of(model)
    n_tokens = len(tok.encode(" " + answer, add_special_tokens=False))
    if n_tokens != 1:
        raise DiffMambaError(f"answer {answer!r} is {n_tokens} tokens for this tokenizer; the lens reads one token, give one word")
    lens_obj = resolve_lens(model, lens)
    rows = target_probs(model, [prompt], [answer], lens=lens_obj, progress=False)
    ids = model.to_tokens(prompt)
    logp = lens_obj.log_probs(model, ids, positions=[-1])[:, 0, 0]  # [layers, vocab]
    top = logp.topk(top_k, dim=-1)
    rows["top_tokens"] = [
        ", ".join(f"{t} ({p:.2f})" for t, p in zip(tok.convert_ids_to_tokens(i.tolist()), v.exp().tolist()))
        for i, v in zip(top.indices, top.values)
    ]
    return rows[["layer", "target", "prob", "rank", "snr_db", "top_tokens"]]


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


def branch_table(models, prompts, n: int = 50, progress: bool = True) -> pd.DataFrame:
    """Mean direct logit contribution of mixer_1, −λ·mixer_2 and each block, per model and layer."""
    from .analysis.branch_lens import branch_lens

    frames = []
    for m in models:
        subset = prompts[:n]  # texts and answers: branch_lens batches them by length
        df = branch_lens(m, [p.prompt for p in subset], [p.answer for p in subset], progress=progress)
        frames.append(df.groupby(["layer", "component"], as_index=False)["value"].mean().assign(model=m.label))
    return pd.concat(frames, ignore_index=True)[["model", "layer", "component", "value"]]


def full_report(ckpts: Sequence[str] | None = None, data: str = "babi:qa1", n: int | None = 200, lens: str = "logit",
                out: str | Path = "reports/report.html", example: int = 0, layer: int | None = None,
                kind: str = "s6", seed: int = 0, progress: bool = True) -> tuple[SnrRun, Path]:
    """Everything in one HTML report: SNR per layer, paired differences, branch lens, implicit
    attention of one example (the first differential layer by default) for each model, tables."""
    run = run_snr(ckpts, data, n, lens, seed=seed, progress=progress)
    branch = branch_table(run.models, run.prompts, progress=progress)
    prompt = run.prompts[min(example, len(run.prompts) - 1)].prompt
    entries = []
    for m in run.models:
        k = layer if layer is not None else (m.cfg.diff_layer_indices[0] if m.cfg.diff_layer_indices else 0)
        entries.append(attention_entry(m, prompt, k, kind=kind))
    return run, run.write_report(out, branch=branch, attention=entries, title="diffmamba-interp report")
