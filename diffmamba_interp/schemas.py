"""The DataFrame schemas that flow from the analysis to the reports, defined once, and their check."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .errors import DiffMambaError

# target_probs: one row per (example, layer); paper_layer = layer − 1 (the paper's Figure 6 index, <NA> at 0)
TARGET_COLUMNS = ("example", "story", "layer", "paper_layer", "prob", "logprob", "rank", "snr_db", "distractor_ratio",
                  "distractor_log_ratio", "target", "n_target_tokens")
# snr_summary / compare().summary: one row per (model, layer, measure)
SUMMARY_COLUMNS = ("model", "layer", "paper_layer", "measure", "mean", "median", "ci_low", "ci_high", "n", "n_clusters",
                   "significant")
# compare().paired: model b − model a per (layer, measure)
PAIRED_COLUMNS = ("model_a", "model_b", "layer", "paper_layer", "measure", "diff_mean", "ci_low", "ci_high", "n",
                  "n_clusters", "significant")
# what the report's figures read of them (analysis output has these and more)
REPORT_SUMMARY_COLUMNS = ("model", "layer", "measure", "mean", "median", "ci_low", "ci_high")
REPORT_PAIRED_COLUMNS = ("model_a", "model_b", "layer", "measure", "diff_mean", "ci_low", "ci_high")
# branch contributions per (model, block, component)
BRANCH_COLUMNS = ("model", "layer", "component", "value")
# the components of a differential block's direct logit contribution (analysis.branch_lens)
BRANCH_COMPONENTS = ("mixer_1", "-λ·mixer_2", "block")


def check_columns(df, required: Sequence[str], name: str) -> pd.DataFrame:
    """Raise DiffMambaError unless ``df`` is a DataFrame holding every column in ``required``."""
    if not isinstance(df, pd.DataFrame):
        raise DiffMambaError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DiffMambaError(
            f"{name} is missing required column(s): {', '.join(missing)} "
            f"(has: {', '.join(map(str, df.columns)) or 'none'})"
        )
    return df


def paper_layer(layer):
    """Our lens layer -> the paper's Figure 6 index (layer − 1; <NA> for layer 0, the embeddings, which
    the paper's HF `hidden_states` do not hold). An int gives an int or None; an array or a Series
    gives a nullable Int64 array."""
    import numpy as np

    if np.ndim(layer) == 0:
        return None if int(layer) == 0 else int(layer) - 1
    values = pd.array(np.asarray(layer, dtype=np.int64) - 1, dtype="Int64")
    values[np.asarray(layer) == 0] = pd.NA
    return values


def with_paper_layer(rows, columns: tuple) -> pd.DataFrame:
    """A DataFrame of `rows` (each holding every column of `columns` but paper_layer, in order), with
    paper_layer derived from layer and placed where `columns` puts it."""
    out = pd.DataFrame(rows, columns=[c for c in columns if c != "paper_layer"])
    values = paper_layer(out["layer"].to_numpy()) if len(out) else pd.array([], dtype="Int64")
    out.insert(columns.index("paper_layer"), "paper_layer", values)
    return out


# task accuracy per (model, task[, length]): the final layer's rank 1 (argmax at the last position); the
# 95% interval is Wilson's at the story-clustered effective size n / deff (`stats.proportion_interval`)
ACCURACY_COLUMNS = ("model", "task", "n", "correct", "accuracy", "ci_low", "ci_high", "deff")
# λ of every differential block: block index i (the paper's layer i), λ and its λ_init
LAMBDA_COLUMNS = ("model", "block", "lambda", "lambda_init")

# the fewest clusters (stories, or questions with --bootstrap question) a summary's intervals should rest on:
# below it `analysis.stats` calls no difference significant (its `min_n`), and the CLI and the report warn
MIN_CLUSTERS = 10


def few_clusters_warning(frame, unit: str = "stories") -> str | None:
    """A one-line warning when a summary or paired frame rests on fewer than `MIN_CLUSTERS` clusters
    at some layer (its `n_clusters` column), else None (also when the frame has no such column)."""
    if frame is None or "n_clusters" not in getattr(frame, "columns", ()) or not len(frame):
        return None
    least = pd.to_numeric(frame["n_clusters"], errors="coerce").min()
    if not least < MIN_CLUSTERS:  # NaN too: nothing to say
        return None
    least = int(least)
    return (f"only {least} {unit} behind these statistics (fewer than {MIN_CLUSTERS}): the intervals are "
            "unreliable and no difference is called significant; use more examples (--n)")
