"""Seeded, vectorised percentile bootstraps of means: over examples, over clusters, over training seeds.

Estimators (all NaN-aware per column, all seeded, no Python loop over resamples):

- `bootstrap_mean(values)`: the point mean / median over examples, and the (α/2, 1 − α/2) percentile
  interval of the resampled means (95% by default). A resample is a vector of counts over the n
  examples (how often each was drawn), so the means of all resamples are one matrix product:
  counts [n_boot, n] @ values [n, k] -> [n_boot, k]; memory O(n_boot·n + n·k). Non-finite values
  (NaN: e.g. a distractor ratio without candidates) drop out of each resample's mean.
- `bootstrap_mean(values, clusters=ids)`: the cluster bootstrap. Questions that share a story are not
  independent, so each resample draws G clusters (stories) with replacement out of the G present, and
  its mean is Σ_drawn cluster sums / Σ_drawn cluster counts (the ratio estimator: every question still
  weighs the same, a story weighs by its size). Same matrix product, on per-cluster sums [G, k] and
  finite counts [G, k]. The point mean and median stay the per-question ones. With every example its
  own cluster this is the per-example bootstrap; `clusters=None` is exactly today's behaviour.
- `paired_bootstrap(a, b)`: the above applied to b − a, same examples (and clusters) for both.
- `seed_level(values_by_seed)`: several checkpoints (training seeds) of one architecture evaluated on
  the same examples. Point estimate: the mean over seeds of the per-seed means; spread: the standard
  deviation of the per-seed means (ddof=1; NaN with one seed). Interval: a two-level bootstrap in which
  each resample draws the seeds with replacement *and* the clusters/examples with replacement, the same
  example draw for every seed (seeds and questions are crossed: every seed sees every question, so a
  hard question is hard for all seeds; drawing questions independently per seed would wrongly average
  that shared variance away as seeds are added). Its mean is the mean over drawn seeds of each drawn
  seed's mean over the drawn examples. This is the "pigeonhole" bootstrap for crossed factors (Owen
  2007, Ann. Appl. Stat. 1(1)): it captures both the seed and the question variance and is mildly
  conservative (it counts the seed × question interaction about twice). With one seed it reduces to
  the cluster (or per-example) bootstrap bit for bit, for the same `seed`. With few seeds (2-3) the
  seed level takes few distinct values, so the interval is crude: report `seed_std` and `seed_means`.
- `paired_seed_level(a_by_seed, b_by_seed)`: b − a between two architectures whose seeds are not paired
  but whose examples are: each resample draws one cluster/example sample shared by every seed of both,
  and the seeds of a and of b independently.

In the seed-level functions an example enters a column only where it is finite in every seed (of both
architectures when paired), so all per-seed means are over the same examples; with one seed each this
is the rule of `bootstrap_mean` / `paired_bootstrap` (where both are finite).

Significance: `BootstrapResult.significant` (and `SeedLevelResult.significant`) is true per column
only when the interval excludes 0, has positive width and rests on at least `min_n` clusters (=
examples without clusters; default 10). A zero-width interval (constant values, one example, one
cluster) is flagged by `degenerate` and is never "significant".

Proportions: `proportion_interval(correct, clusters)` is the Wilson score interval of an accuracy with
the effective sample size of its story clustering (Kish's design effect, from the cluster-robust
variance of the mean), so questions of one story count as less than independent evidence; unlike a
bootstrap it stays sane at 0% and 100%. Without clusters (or one question per story) it is the plain
Wilson interval.

Measures: `log_odds_db(logprob)` = 10·log10(p / (1 − p)) from a float64 log-probability with no floor;
`log_ratio(logprob_target, log_mass)` = ln(p / Σ p(other candidates)) and `log_mass` the log of a
candidate mass from NaN-padded candidate log-probs. Average these logs (and report medians) rather than
the raw ratio p / Σ p(c), whose mean is dominated by a few huge values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import DiffMambaError

__all__ = ["BootstrapResult", "SeedLevelResult", "resample_counts", "bootstrap_mean", "paired_bootstrap",
           "seed_level", "paired_seed_level", "proportion_interval", "wilson_interval", "log_odds_db", "LOG_ODDS_DB_MAX", "log_ratio", "log_mass"]

_DB = 10 / np.log(10)  # dB per nat of odds


class _Interval:
    """`degenerate` and `significant` for a result with ci_low, ci_high, n_clusters and min_n."""

    @property
    def degenerate(self) -> np.ndarray:
        """[k] True where the interval has no positive width (ci_low == ci_high) or is NaN."""
        return ~(self.ci_high > self.ci_low)

    @property
    def significant(self) -> np.ndarray:
        """[k] True where the interval excludes 0, has positive width and n_clusters >= min_n."""
        excludes = (self.ci_low > 0) | (self.ci_high < 0)
        return excludes & ~self.degenerate & (self.n_clusters >= self.min_n)


def _check_fields(obj, names) -> None:
    shapes = {name: np.shape(getattr(obj, name)) for name in names}
    if len(set(shapes.values())) != 1 or len(shapes[names[0]]) != 1:
        raise DiffMambaError(f"{type(obj).__name__} fields must be 1-d arrays of one length, got shapes {shapes}")


@dataclass
class BootstrapResult(_Interval):
    """Per column k of the input: the point mean and median and the bootstrap CI of the mean.

    n: finite examples per column; n_clusters: clusters with at least one finite example per column
    (= n without clusters). See `degenerate` / `significant` (which uses `min_n`)."""

    mean: np.ndarray  # [k]
    median: np.ndarray  # [k]
    ci_low: np.ndarray  # [k]
    ci_high: np.ndarray  # [k]
    n: np.ndarray  # [k]  non-NaN examples per column
    n_boot: int
    ci: float
    n_clusters: np.ndarray | None = None  # [k]; None -> n (every example its own cluster)
    min_n: int = 10

    def __post_init__(self) -> None:
        if self.n_clusters is None:
            self.n_clusters = np.array(self.n, copy=True)
        _check_fields(self, ("mean", "median", "ci_low", "ci_high", "n", "n_clusters"))


@dataclass
class SeedLevelResult(_Interval):
    """Seed-level statistics per column k (see the module docstring).

    mean: mean over seeds of the per-seed means (paired: that of b minus that of a); ci_low, ci_high:
    the two-level bootstrap interval of it. seed_means: per architecture (one for `seed_level`, (a, b)
    for `paired_seed_level`) the per-seed means [n_seeds, k]; seed_std: per architecture the std over
    seeds of those (ddof=1, NaN with one seed). n / n_clusters: examples / clusters finite in every seed."""

    mean: np.ndarray  # [k]
    ci_low: np.ndarray  # [k]
    ci_high: np.ndarray  # [k]
    seed_means: tuple  # of [n_seeds, k]
    seed_std: tuple  # of [k]
    n: np.ndarray  # [k]
    n_clusters: np.ndarray  # [k]
    n_boot: int
    ci: float
    min_n: int = 10

    def __post_init__(self) -> None:
        _check_fields(self, ("mean", "ci_low", "ci_high", "n", "n_clusters"))

    @property
    def n_seeds(self) -> tuple:
        return tuple(len(m) for m in self.seed_means)


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


def _check_ci(ci: float) -> None:
    if not 0 < ci < 1:
        raise DiffMambaError(f"ci must be in (0, 1), got {ci}")


def _cluster_index(clusters, n: int):
    """clusters (one id per example, any sortable ids) -> (index [n] into 0..G-1, G); None -> (None, n)."""
    if clusters is None:
        return None, n
    c = np.asarray(clusters)
    if c.shape != (n,):
        raise DiffMambaError(f"clusters must be one id per example, shape ({n},), got shape {c.shape}")
    if c.dtype.kind == "f" and np.isnan(c).any():
        raise DiffMambaError("clusters contain NaN; every example needs a cluster id")
    _, g = np.unique(c, return_inverse=True)
    g = g.reshape(-1)
    return g, int(g.max()) + 1 if n else 0


def _by_cluster(x: np.ndarray, g, G: int) -> np.ndarray:
    """x [n, k] -> per-cluster sums [G, k] (x itself when g is None)."""
    if g is None:
        return x
    out = np.zeros((G, x.shape[1]))
    np.add.at(out, g, x)
    return out


def _ratio(sums: np.ndarray, taken: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(taken > 0, sums / taken, np.nan)


def _percentiles(boot: np.ndarray, ci: float):
    q = 100 * (1 - ci) / 2
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, silently
        return np.nanpercentile(boot, [q, 100 - q], axis=0)


def bootstrap_mean(values, n_boot: int = 1000, seed: int | np.random.Generator = 0, ci: float = 0.95,
                   clusters=None, min_n: int = 10) -> BootstrapResult:
    """values [n_examples, k] (or [n_examples]) -> mean, median and percentile CI of the mean per column.

    clusters: None (resample examples) or one cluster id per example (e.g. the story of each
    question): resample whole clusters, see the module docstring. min_n: the number of clusters
    (examples without clusters) below which `significant` is False.
    """
    v = _as_2d(values)  # [n, k]
    _check_ci(ci)
    g, G = _cluster_index(clusters, v.shape[0])
    counts = resample_counts(G, n_boot, seed).astype(np.float64)  # [n_boot, G]
    ok = np.isfinite(v)
    per_sum = _by_cluster(np.where(ok, v, 0.0), g, G)  # [G, k]
    per_ok = _by_cluster(ok.astype(np.float64), g, G)  # [G, k]
    boot = _ratio(counts @ per_sum, counts @ per_ok)  # [n_boot, k]
    low, high = _percentiles(boot, ci)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.where(ok, v, np.nan), axis=0)
        median = np.nanmedian(np.where(ok, v, np.nan), axis=0)
    return BootstrapResult(mean=mean, median=median, ci_low=low, ci_high=high, n=ok.sum(0), n_boot=n_boot, ci=ci,
                           n_clusters=(per_ok > 0).sum(0), min_n=min_n)


def paired_bootstrap(a, b, n_boot: int = 1000, seed: int | np.random.Generator = 0, ci: float = 0.95,
                     clusters=None, min_n: int = 10) -> BootstrapResult:
    """Paired bootstrap of b − a over examples: a, b [n_examples, k] measured on the same examples.

    Resampling the per-example differences keeps each example's pairing, so the CI accounts for
    examples being easy or hard for both models. `mean` is mean(b − a) over examples where both are
    finite (= mean(b) − mean(a) when nothing is NaN). clusters: as in `bootstrap_mean`.
    """
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise DiffMambaError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_mean(b - a, n_boot=n_boot, seed=seed, ci=ci, clusters=clusters, min_n=min_n)


# -- several training seeds -----------------------------------------------------------------------
def _stack_seeds(values_by_seed, what: str) -> np.ndarray:
    """A sequence of per-seed [n] or [n, k] arrays (or an array [S, n] / [S, n, k]) -> [S, n, k]."""
    seeds = [_as_2d(x) for x in values_by_seed]
    if not seeds:
        raise DiffMambaError(f"{what} needs at least one seed")
    if len({s.shape for s in seeds}) != 1:
        raise DiffMambaError(f"{what}: every seed needs the same [n_examples, k], got {[s.shape for s in seeds]}")
    return np.stack(seeds)


def _seed_means(x: np.ndarray, ok: np.ndarray):
    """x [S, n, k], common mask ok [n, k] -> per-seed means [S, k] and their std over seeds [k]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(np.where(ok, x, np.nan), axis=1)
        std = means.std(0, ddof=1) if len(x) > 1 else np.full(x.shape[2], np.nan)
    return means, std


def _seed_boot(x: np.ndarray, ok: np.ndarray, g, G: int, counts: np.ndarray, rng) -> np.ndarray:
    """Numerators [n_boot, k]: per resample, the mean over drawn seeds of each seed's sum over the drawn
    clusters (divide by the drawn finite count for the mean). Loops over seeds, not resamples."""
    sums = np.stack([counts @ _by_cluster(np.where(ok, s, 0.0), g, G) for s in x])  # [S, n_boot, k]
    weights = resample_counts(len(x), counts.shape[0], rng) / len(x)  # [n_boot, S], rows sum to 1
    return np.einsum("bs,sbk->bk", weights, sums)


def _two_level(groups, n_boot, seed, ci, clusters):
    """groups: per architecture [S, n, k]; returns (estimates per group, boot means per group, n, n_clusters)."""
    _check_ci(ci)
    n = groups[0].shape[1]
    if any(x.shape[1:] != groups[0].shape[1:] for x in groups):
        raise DiffMambaError(f"architectures need the same [n_examples, k], got {[x.shape[1:] for x in groups]}")
    g, G = _cluster_index(clusters, n)
    ok = np.all([np.isfinite(x).all(0) for x in groups], axis=0)  # [n, k] finite in every seed
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    counts = resample_counts(G, n_boot, rng).astype(np.float64)  # drawn first: one seed = bootstrap_mean
    per_ok = _by_cluster(ok.astype(np.float64), g, G)
    taken = counts @ per_ok  # [n_boot, k], the same for every seed
    boots = [_ratio(_seed_boot(x, ok, g, G, counts, rng), taken) for x in groups]
    points = [_seed_means(x, ok) for x in groups]
    return points, boots, ok.sum(0), (per_ok > 0).sum(0)


def seed_level(values_by_seed, n_boot: int = 1000, seed: int | np.random.Generator = 0, ci: float = 0.95,
               clusters=None, min_n: int = 10) -> SeedLevelResult:
    """Several training seeds of one architecture on the same examples -> seed-level mean and interval.

    values_by_seed: one [n_examples, k] (or [n_examples]) array per seed, rows = the same examples.
    mean = mean over seeds of the per-seed means; seed_std = their std (ddof=1); the interval is the
    two-level bootstrap (seeds, and clusters/examples shared across seeds) of the module docstring.
    With one seed, mean / ci_low / ci_high equal `bootstrap_mean(values, clusters=...)` exactly.
    """
    x = _stack_seeds(values_by_seed, "seed_level")
    [(means, std)], [boot], n, nc = _two_level([x], n_boot, seed, ci, clusters)
    low, high = _percentiles(boot, ci)
    return SeedLevelResult(mean=means.mean(0), ci_low=low, ci_high=high, seed_means=(means,), seed_std=(std,),
                           n=n, n_clusters=nc, n_boot=n_boot, ci=ci, min_n=min_n)


def paired_seed_level(a_by_seed, b_by_seed, n_boot: int = 1000, seed: int | np.random.Generator = 0,
                      ci: float = 0.95, clusters=None, min_n: int = 10) -> SeedLevelResult:
    """b − a between two architectures with several (unpaired) seeds each, on the same (paired) examples.

    mean = seed-level mean of b − seed-level mean of a, over the examples finite in every seed of
    both. Each resample draws one cluster/example sample shared by all seeds of a and b (the pairing
    of examples) and the seeds of a and of b independently (seed i of a has nothing to do with seed i
    of b). seed_means / seed_std are (a's, b's). The numbers of seeds may differ.
    """
    a = _stack_seeds(a_by_seed, "paired_seed_level (a)")
    b = _stack_seeds(b_by_seed, "paired_seed_level (b)")
    points, (boot_a, boot_b), n, nc = _two_level([a, b], n_boot, seed, ci, clusters)
    (ma, sa), (mb, sb) = points
    low, high = _percentiles(boot_b - boot_a, ci)
    return SeedLevelResult(mean=mb.mean(0) - ma.mean(0), ci_low=low, ci_high=high, seed_means=(ma, mb),
                           seed_std=(sa, sb), n=n, n_clusters=nc, n_boot=n_boot, ci=ci, min_n=min_n)


# -- measures -------------------------------------------------------------------------------------
_LOGPROB_MAX = -np.nextafter(0.0, 1.0)  # -2**-1074, the negative float64 closest to 0


def wilson_interval(correct, n, z: float = 1.959963984540054) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval (95% by default) of a proportion `correct` / `n` (arrays; `n` may be an
    effective, non-integer size): sane at 0% and 100% and for small n, unlike the normal approximation."""
    k, n = np.asarray(correct, dtype=np.float64), np.asarray(n, dtype=np.float64)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))  # exact ends, not 1e-17 off
    high = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


def proportion_interval(correct, clusters=None, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """correct [n] (bool) and one cluster id per question (or None) -> (low, high, design effect).

    Design effect d = max(1, V_cluster / V_iid): V_iid = p(1 − p)/n; V_cluster = G/(G − 1) ·
    Σ_g (s_g − p·m_g)² / n², the cluster-robust variance of the mean (s_g correct of the m_g questions
    of cluster g). The interval is Wilson's at the effective size n / d with the same p."""
    x = np.asarray(correct, dtype=np.float64).reshape(-1)
    n = x.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = x.mean()
    deff = 1.0
    g, G = _cluster_index(clusters, n)
    if g is not None and 1 < G < n and 0 < p < 1:
        s = np.bincount(g, weights=x, minlength=G)
        m = np.bincount(g, minlength=G)
        v_cluster = G / (G - 1) * np.sum((s - p * m) ** 2) / n**2
        deff = max(1.0, float(v_cluster / (p * (1 - p) / n)))
    low, high = wilson_interval(p * n / deff, n / deff, z)
    return float(low), float(high), deff


def log_odds_db(logprob) -> np.ndarray:
    """10·log10(p / (1 − p)) in dB from log p (float64), with no floor.

    log(1 − p) is computed as log1p(−exp(log p)) for p < 1/2 and log(−expm1(log p)) for p ≥ 1/2, so
    the result is accurate to rounding over the whole range: p = 1e-300 gives −3000 dB (and a log p
    whose p underflows, e.g. −1000, still gives its finite value), p = 1 − 1e-9 gives 90 dB. log p =
    −inf (p = 0) gives −inf, NaN gives NaN. log p = 0 (p = 1, i.e. 1 − p below the resolution of the
    input) has no finite log-odds: it is clipped at the float64 limit, log p = −2^−1074, giving
    `LOG_ODDS_DB_MAX` (≈ 3233 dB), which marks a saturated value (count those; prefer the median).
    Note that a log-softmax in float32 already rounds log p to 0 for p > 1 − 6e-8 (≈ 72 dB).
    Positive log p is an error.
    """
    lp = np.asarray(logprob, dtype=np.float64)
    if np.any(lp > 0):
        raise DiffMambaError(f"log_odds_db needs log-probabilities <= 0, got max {np.nanmax(lp)!r}")
    lp = np.minimum(lp, _LOGPROB_MAX)  # NaN stays NaN
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        small = lp < -np.log(2)
        log1m = np.where(small, np.log1p(-np.exp(np.where(small, lp, -1.0))),
                         np.log(-np.expm1(np.where(small, -1.0, lp))))
        out = _DB * (lp - log1m)
    return out


LOG_ODDS_DB_MAX = float(log_odds_db(0.0))


def log_ratio(logprob_target, log_mass) -> np.ndarray:
    """ln(p(target) / Σ p(other candidates)) = log p(target) − log Σ p(c), in nats (÷ ln 10 for log10).

    log_mass: the log of the candidates' total probability (see `log_mass`), NaN where an example
    has no candidates (the result is then NaN). No clamp: a mass of 0 (log_mass = −inf) gives +inf.
    """
    with np.errstate(invalid="ignore"):
        return np.asarray(logprob_target, dtype=np.float64) - np.asarray(log_mass, dtype=np.float64)


def log_mass(logprob_candidates, axis: int = -1) -> np.ndarray:
    """log Σ_c p(c) along `axis` from candidate log-probs (NaN-padded: NaN entries are no candidate),
    computed as a log-sum-exp (no underflow); NaN where there is no candidate, −inf where all p are 0."""
    lp = np.asarray(logprob_candidates, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, silently
        m = np.nanmax(lp, axis=axis, keepdims=True)
        shift = np.where(np.isfinite(m), m, 0.0)
        out = shift + np.log(np.nansum(np.exp(lp - shift), axis=axis, keepdims=True))
        out = np.where(np.isnan(m), np.nan, out)
    return np.squeeze(out, axis=axis)
