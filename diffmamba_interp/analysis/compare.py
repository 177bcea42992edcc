"""Compare models layer by layer on the same prompts: summaries with bootstrap CIs and paired differences.

`compare` runs `target_probs` for each model, stacks the rows with a `model` column
(`per_example`), summarises them with `snr_summary` (`summary`), and for every pair of models with
the same n_layers (a = the earlier one, b = the later one) runs a paired bootstrap over examples of
b − a per layer and measure (`paired`). Models of different depth are not paired layer by layer
(a note says so); their summaries are still comparable, e.g. on relative depth layer / n_layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import DiffMambaError
from ..model import load_model
from ..schemas import PAIRED_COLUMNS, SUMMARY_COLUMNS, TARGET_COLUMNS, check_columns, with_paper_layer
from .lens import resolve_lens
from .snr import MEASURES, example_clusters, snr_summary, target_probs
from .stats import paired_bootstrap

__all__ = ["PAIRED_COLUMNS", "CompareResult", "compare", "paired_summary"]



@dataclass
class CompareResult:
    """summary: model, layer, measure, mean, median, ci_low, ci_high.
    paired: model_a, model_b, layer, measure, diff_mean (b − a), ci_low, ci_high (empty when no
    two models share n_layers). per_example: the `target_probs` rows plus a `model` column.
    labels: the model names in input order; notes: anything the user should know (e.g. unpaired)."""

    summary: pd.DataFrame
    paired: pd.DataFrame
    per_example: pd.DataFrame
    labels: list[str]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_columns(self.summary, SUMMARY_COLUMNS, "summary")
        check_columns(self.paired, PAIRED_COLUMNS, "paired")
        check_columns(self.per_example, ("model", *TARGET_COLUMNS), "per_example")
        if len(set(self.labels)) != len(self.labels):
            raise DiffMambaError(f"model labels must be unique, got {self.labels}")
        unknown = set(self.summary["model"]) - set(self.labels)
        if unknown:
            raise DiffMambaError(f"summary has models {sorted(unknown)} not among labels {self.labels}")

    def difference(self, layer: int, measure: str = "prob") -> pd.DataFrame:
        """The paired rows (b − a with CI) at one layer for one measure."""
        p = self.paired
        return p[(p["layer"] == layer) & (p["measure"] == measure)].reset_index(drop=True)


def paired_summary(per_example: pd.DataFrame, a: str, b: str, n_boot: int = 1000, seed: int = 0,
                   measures: Sequence[str] = MEASURES, ci: float = 0.95, bootstrap: str = "story",
                   min_n: int = 10) -> pd.DataFrame:
    """Paired bootstrap of model b − model a per layer and measure over shared examples -> PAIRED_COLUMNS.
    bootstrap: "story" resamples story clusters (the same draw for both models), "question" questions."""
    rows = []
    ga = per_example[per_example["model"] == a]
    gb = per_example[per_example["model"] == b]
    clusters = example_clusters(ga, bootstrap)
    for m in measures:
        wa = ga.pivot(index="example", columns="layer", values=m)
        wb = gb.pivot(index="example", columns="layer", values=m)
        if list(wa.columns) != list(wb.columns):
            raise DiffMambaError(f"models {a!r} and {b!r} have different layers; they cannot be paired")
        wb = wb.reindex(index=wa.index)
        res = paired_bootstrap(wa.to_numpy(np.float64), wb.to_numpy(np.float64), n_boot=n_boot, seed=seed, ci=ci,
                               clusters=None if clusters is None else clusters.reindex(wa.index).to_numpy(),
                               min_n=min_n)
        sig = res.significant
        for j, layer in enumerate(wa.columns):
            rows.append((a, b, int(layer), m, res.mean[j], res.ci_low[j], res.ci_high[j], int(res.n[j]),
                         int(res.n_clusters[j]), bool(sig[j])))
    out = with_paper_layer(rows, PAIRED_COLUMNS)
    return out


def _label(item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return Path(item).name or str(item)
    return getattr(item, "label", None) or item.cfg.arch


def compare(models_or_paths, prompts, answers=None, lens="logit", labels: Sequence[str] | None = None,
            candidates=None, n_boot: int = 1000, seed: int = 0, tokenizer=None, batch_size: int = 8,
            progress: bool = True, bootstrap: str = "story", chunk_size: int | None = None,
            known: dict | None = None) -> CompareResult:
    """Run the same prompts through several models (HookedMamba objects or checkpoint paths).

    lens: a name of `lens.LENSES` ("logit", "tuned": the lens saved next to the checkpoint), a
    Lens, or one lens per model. Paths are loaded with `diffmamba_interp.load_model`. Labels
    default to the checkpoint directory name, the model's `label` or its arch (made unique with a
    suffix). See the module docstring for the pairing rule.

    known: label -> that model's `target_probs` rows on these prompts with this lens, already computed
    (e.g. by `seeds.compare_seeds` on the same checkpoint): used as they are, not run again.
    """
    items = list(models_or_paths)
    prompts = list(prompts)
    answers = list(answers) if answers is not None else None
    if not items:
        raise DiffMambaError("compare needs at least one model")
    lenses = list(lens) if isinstance(lens, (list, tuple)) else [lens] * len(items)
    if len(lenses) != len(items):
        raise DiffMambaError(f"{len(items)} models but {len(lenses)} lenses")
    if labels is None:
        labels = [_label(x) for x in items]
        total = {lab: labels.count(lab) for lab in labels}
        count: dict[str, int] = {}
        for i, lab in enumerate(labels):
            if total[lab] > 1:  # "mamba2", "mamba2" -> "mamba2_1", "mamba2_2"
                count[lab] = count.get(lab, 0) + 1
                labels[i] = f"{lab}_{count[lab]}"
    labels = [str(x) for x in labels]
    if len(labels) != len(items):
        raise DiffMambaError(f"{len(items)} models but {len(labels)} labels")
    if len(set(labels)) != len(labels):
        raise DiffMambaError(f"model labels must be unique, got {labels}")

    frames, depth, warned = [], {}, set()  # warned: one warning of unknown tokens, not one per model
    for item, lab, ln in zip(items, labels, lenses):
        model = load_model(item) if isinstance(item, (str, os.PathLike)) else item
        if known is not None and lab in known:
            df = known[lab]
            if len(df) != len(prompts) * (model.cfg.n_layers + 1):
                raise DiffMambaError(f"the known rows of {lab} are not {len(prompts)} prompts x {model.cfg.n_layers + 1} layers")
        else:
            df = target_probs(model, prompts, answers, lens=resolve_lens(model, ln), candidates=candidates,
                              tokenizer=tokenizer, batch_size=batch_size, progress=progress, chunk_size=chunk_size,
                              warned=warned)
        frames.append(df.assign(model=lab)[["model", *TARGET_COLUMNS]])
        depth[lab] = model.cfg.n_layers
    per_example = pd.concat(frames, ignore_index=True)
    summary = snr_summary(per_example, n_boot=n_boot, seed=seed, bootstrap=bootstrap)

    notes, pairs = [], []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if depth[a] == depth[b]:
                pairs.append(paired_summary(per_example, a, b, n_boot=n_boot, seed=seed, bootstrap=bootstrap))
            else:
                notes.append(f"{a} ({depth[a]} layers) and {b} ({depth[b]} layers) have different depths: "
                             "no paired layer-by-layer comparison")
    paired = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(columns=list(PAIRED_COLUMNS))
    return CompareResult(summary=summary, paired=paired, per_example=per_example, labels=labels, notes=notes)
