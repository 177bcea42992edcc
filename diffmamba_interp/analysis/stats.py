"""Seeded, vectorised percentile bootstrap of means over examples (and of paired differences).

A resample is a vector of counts over the n examples (how often each was drawn), so the means of
all resamples are one matrix product: counts [n_boot, n] @ values [n, k] / n -> [n_boot, k]. No
Python loop runs over resamples, memory is O(n_boot·n + n·k), and NaN values (e.g. a distractor
ratio for an example without candidates) are left out of each resample's mean. The CI is the
(α/2, 1 − α/2) percentile interval of the resampled means (95% by default).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import DiffMambaError

__all__ = ["BootstrapResult", "resample_counts", "bootstrap_mean", "paired_bootstrap"]


@dataclass
class BootstrapResult:
    """Per column k of the input: the point mean and median and the bootstrap CI of the mean."""

    mean: np.ndarray  # [k]
    median: np.ndarray  # [k]
    ci_low: np.ndarray  # [k]
    ci_high: np.ndarray  # [k]
    n: np.ndarray  # [k]  non-NaN examples per column
    n_boot: int
    ci: float

    def __post_init__(self) -> None:
        shapes = {name: np.shape(getattr(self, name)) for name in ("mean", "median", "ci_low", "ci_high", "n")}
        if len(set(shapes.values())) != 1 or len(shapes["mean"]) != 1:
            raise DiffMambaError(f"BootstrapResult fields must be 1-d arrays of one length, got shapes {shapes}")


def resample_counts(n: int, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """counts [n_boot, n]: row b says how often each of n examples was drawn in resample b (rows sum to n)."""
    if n <= 0 or n_boot <= 0:
        raise DiffMambaError(f"bootstrap needs n >= 1 examples and n_boot >= 1 resamples, got n={n}, n_boot={n_boot}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [n_boot, n]
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_boot).reshape(n_boot, n)


def _as_2d(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2:
        raise DiffMambaError(f"bootstrap values must be [n_examples] or [n_examples, k], got shape {v.shape}")
    return v


def bootstrap_mean(values, n_boot: int = 1000, seed: int | np.random.Generator = 0, ci: float = 0.95) -> BootstrapResult:
    """values [n_examples, k] (or [n_examples]) -> mean, median and percentile CI of the mean per column."""
    v = _as_2d(values)  # [n, k]
    if not 0 < ci < 1:
        raise DiffMambaError(f"ci must be in (0, 1), got {ci}")
    counts = resample_counts(v.shape[0], n_boot, seed).astype(np.float64)  # [n_boot, n]
    ok = np.isfinite(v)
    sums = counts @ np.where(ok, v, 0.0)  # [n_boot, k]
    taken = counts @ ok.astype(np.float64)  # [n_boot, k]
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, silently
        boot = np.where(taken > 0, sums / taken, np.nan)  # [n_boot, k]
        q = 100 * (1 - ci) / 2
        low, high = np.nanpercentile(boot, [q, 100 - q], axis=0)
        mean = np.nanmean(np.where(ok, v, np.nan), axis=0)
        median = np.nanmedian(np.where(ok, v, np.nan), axis=0)
    return BootstrapResult(mean=mean, median=median, ci_low=low, ci_high=high, n=ok.sum(0), n_boot=n_boot, ci=ci)


def paired_bootstrap(a, b, n_boot: int = 1000, seed: int | np.random.Generator = 0, ci: float = 0.95) -> BootstrapResult:
    """Paired bootstrap of b − a over examples: a, b [n_examples, k] measured on the same examples.

    Resampling the per-example differences keeps each example's pairing, so the CI accounts for
    examples being easy or hard for both models. `mean` is mean(b − a) over examples where both are
    finite (= mean(b) − mean(a) when nothing is NaN).
    """
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise DiffMambaError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_mean(b - a, n_boot=n_boot, seed=seed, ci=ci)
