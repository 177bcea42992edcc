"""Several checkpoints per architecture (training seeds): seed-level per-layer statistics and the
comparison of two architectures across their seeds.

A run differs from another by its training seed as much as by its architecture, so a claim such as
"Diff-Mamba puts more probability on the needle at layer k" needs several seeds per architecture.
`compare_seeds` runs `target_probs` for every checkpoint of every group on the same prompts and
summarises each group with `stats.seed_level` (the mean over seeds of the per-seed means, the
across-seed std, and a two-level bootstrap over seeds and story clusters) and each pair of groups
with `stats.paired_seed_level` (examples paired, seeds not).
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
from ..schemas import TARGET_COLUMNS, with_paper_layer
from .lens import resolve_lens
from .snr import BOOTSTRAPS, MEASURES, example_clusters, target_probs
from .stats import paired_seed_level, seed_level

__all__ = ["SEED_SUMMARY_COLUMNS", "SEED_PAIRED_COLUMNS", "PER_SEED_COLUMNS", "SeedCompareResult", "compare_seeds"]

SEED_SUMMARY_COLUMNS = ("group", "layer", "paper_layer", "measure", "mean", "ci_low", "ci_high", "seed_std", "n_seeds",
                        "n", "n_clusters", "significant")
SEED_PAIRED_COLUMNS = ("group_a", "group_b", "layer", "paper_layer", "measure", "diff_mean", "ci_low", "ci_high",
                       "n_seeds_a", "n_seeds_b", "n", "n_clusters", "significant")
# one checkpoint's mean over the examples finite in every seed of its group: the seed-level mean is their mean
PER_SEED_COLUMNS = ("group", "model", "layer", "paper_layer", "measure", "mean")


@dataclass
class SeedCompareResult:
    """summary: SEED_SUMMARY_COLUMNS (one row per group, layer, measure); paired: SEED_PAIRED_COLUMNS
    (group b − group a); per_example: the `target_probs` rows with `group` and `model` columns;
    groups: group name -> the labels of its checkpoints; per_seed: PER_SEED_COLUMNS, each checkpoint's
    mean (over the examples finite in every seed of its group), whose mean over seeds is summary's mean."""

    summary: pd.DataFrame
    paired: pd.DataFrame
    per_example: pd.DataFrame
    groups: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    per_seed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(PER_SEED_COLUMNS)))


def _by_seed(rows: pd.DataFrame, models: list[str], measure: str, layers) -> list[np.ndarray]:
    """One [n_examples, n_layers] array per checkpoint, rows in example order."""
    out = []
    for m in models:
        g = rows[rows.model == m]
        out.append(g.pivot(index="example", columns="layer", values=measure).reindex(columns=layers).sort_index()
                   .to_numpy(np.float64))
    return out


def compare_seeds(groups: dict[str, Sequence], prompts, answers=None, lens="auto", candidates=None, n_boot: int = 1000,
                  seed: int = 0, batch_size: int = 8, progress: bool = True, bootstrap: str = "story",
                  min_n: int = 10, chunk_size: int | None = None) -> SeedCompareResult:
    """groups: group name (e.g. the architecture) -> its checkpoints (paths or HookedMamba models,
    one per training seed), all of one depth. Runs every checkpoint on the same prompts (a lens name
    of `lens.LENSES` or a Lens) and returns seed-level summaries and the paired comparison of every
    pair of groups (the first named group is a)."""
    if bootstrap not in BOOTSTRAPS:
        raise DiffMambaError(f"unknown bootstrap {bootstrap!r}; expected one of {', '.join(BOOTSTRAPS)}")
    if not groups or any(len(list(v)) == 0 for v in groups.values()):
        raise DiffMambaError("compare_seeds needs at least one checkpoint in every group")
    prompts = list(prompts)
    frames, members, depth, warned = [], {}, {}, set()  # warned: one warning of unknown tokens, not one per model
    for name, items in groups.items():
        members[name] = []
        for k, item in enumerate(items):
            model = load_model(item) if isinstance(item, (str, os.PathLike)) else item
            label = f"{name}/{Path(item).name if isinstance(item, (str, os.PathLike)) else getattr(model, 'label', k)}"
            if label in sum(members.values(), []):
                label = f"{label}#{k}"
            members[name].append(label)
            depth.setdefault(name, set()).add(model.cfg.n_layers)
            df = target_probs(model, prompts, answers, lens=resolve_lens(model, lens), candidates=candidates,
                              batch_size=batch_size, progress=progress, chunk_size=chunk_size, warned=warned)
            frames.append(df.assign(group=name, model=label)[["group", "model", *TARGET_COLUMNS]])
    uneven = {g: sorted(d) for g, d in depth.items() if len(d) > 1}
    if uneven:
        raise DiffMambaError(f"the checkpoints of a group must have one depth; got {uneven}")
    per_example = pd.concat(frames, ignore_index=True)
    clusters = example_clusters(frames[0], bootstrap)
    cl = None if clusters is None else clusters.sort_index().to_numpy()
    rows, pairs, notes, seed_rows = [], [], [], []
    for name in groups:
        layers = np.sort(per_example[per_example.group == name].layer.unique())
        for m in MEASURES:
            res = seed_level(_by_seed(per_example, members[name], m, layers), n_boot=n_boot, seed=seed, clusters=cl,
                             min_n=min_n)
            sig = res.significant
            for j, layer in enumerate(layers):
                rows.append((name, int(layer), m, res.mean[j], res.ci_low[j], res.ci_high[j], res.seed_std[0][j],
                             res.n_seeds[0], int(res.n[j]), int(res.n_clusters[j]), bool(sig[j])))
            for label, means in zip(members[name], res.seed_means[0]):
                seed_rows += [(name, label, int(layer), m, float(v)) for layer, v in zip(layers, means)]
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if depth[a] != depth[b]:
                notes.append(f"groups {a} and {b} have different depths: no paired layer-by-layer comparison")
                continue
            layers = np.sort(per_example[per_example.group == a].layer.unique())
            for m in MEASURES:
                res = paired_seed_level(_by_seed(per_example, members[a], m, layers),
                                        _by_seed(per_example, members[b], m, layers), n_boot=n_boot, seed=seed,
                                        clusters=cl, min_n=min_n)
                sig = res.significant
                for j, layer in enumerate(layers):
                    pairs.append((a, b, int(layer), m, res.mean[j], res.ci_low[j], res.ci_high[j], res.n_seeds[0],
                                  res.n_seeds[1], int(res.n[j]), int(res.n_clusters[j]), bool(sig[j])))
    summary = with_paper_layer(rows, SEED_SUMMARY_COLUMNS)
    paired = with_paper_layer(pairs, SEED_PAIRED_COLUMNS)
    return SeedCompareResult(summary, paired, per_example, members, notes, with_paper_layer(seed_rows, PER_SEED_COLUMNS))
