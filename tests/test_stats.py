"""Cluster / seed-level bootstraps and the log-scale measures of analysis.stats, on hand-computed cases."""

import numpy as np
import pytest

from diffmamba_interp.analysis.stats import (LOG_ODDS_DB_MAX, bootstrap_mean, log_mass, log_odds_db, log_ratio,
                                             paired_bootstrap, paired_seed_level, resample_counts, seed_level)
from diffmamba_interp.errors import DiffMambaError


def _brute_cluster_means(v, g, counts):
    """Per resample (row of cluster counts), repeat each example as often as its cluster was drawn, nanmean."""
    return np.array([[np.nanmean(np.repeat(v[:, j], row[g])) for j in range(v.shape[1])] for row in counts])


# -- cluster bootstrap ----------------------------------------------------------------------------
def test_cluster_bootstrap_tiny_case_is_enumerable():
    # story s1 = two questions worth 1, story s2 = one question worth 4. Drawing 2 stories:
    # {s1,s1} -> 4/4 = 1 (p 1/4), {s1,s2} -> 6/3 = 2 (p 1/2), {s2,s2} -> 8/2 = 4 (p 1/4).
    v, clusters = np.array([1.0, 1.0, 4.0]), np.array(["s1", "s1", "s2"])
    res = bootstrap_mean(v, n_boot=4000, seed=3, clusters=clusters)
    assert res.mean.tolist() == [2.0] and res.median.tolist() == [1.0]  # every question weighs the same
    assert res.n.tolist() == [3] and res.n_clusters.tolist() == [2]
    assert res.ci_low.tolist() == [1.0] and res.ci_high.tolist() == [4.0]  # 1/4 of the mass at each end
    c = resample_counts(2, 4000, seed=3)  # the same draws, by hand
    boot = (2 * c[:, 0] + 4 * c[:, 1]) / (2 * c[:, 0] + c[:, 1])
    assert set(np.unique(boot)) == {1.0, 2.0, 4.0}
    assert abs(np.mean(boot == 2.0) - 0.5) < 0.05
    # the central 40% interval sits inside the mass at 2: zero width, flagged
    narrow = bootstrap_mean(v, n_boot=4000, seed=3, clusters=clusters, ci=0.4)
    assert narrow.ci_low.tolist() == narrow.ci_high.tolist() == [2.0] and narrow.degenerate.all()


def test_cluster_bootstrap_matches_brute_force_with_nan():
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 4, 5, 6, 3]
    g = np.repeat(np.arange(len(sizes)), sizes)  # 24 examples in 7 stories of unequal size
    v = rng.normal(size=(len(g), 3)) + g[:, None]
    v[0, 1] = np.nan  # story 0 (one question) has no value in column 1
    v[[5, 7], 2] = np.nan
    labels = np.array([f"story{i}" for i in g])  # sortable ids in the same order as g
    res = bootstrap_mean(v, n_boot=300, seed=7, clusters=labels)
    loop = _brute_cluster_means(v, g, resample_counts(7, 300, seed=7))
    assert np.allclose(res.ci_low, np.nanpercentile(loop, 2.5, axis=0))
    assert np.allclose(res.ci_high, np.nanpercentile(loop, 97.5, axis=0))
    assert np.allclose(res.mean, np.nanmean(v, 0)) and np.allclose(res.median, np.nanmedian(v, 0))
    assert res.n.tolist() == [24, 23, 22] and res.n_clusters.tolist() == [7, 6, 7]
    pr = paired_bootstrap(v, v + 1.5, n_boot=300, seed=7, clusters=labels)
    assert np.allclose(pr.mean, 1.5) and pr.n.tolist() == [24, 23, 22] and pr.degenerate.all()
    with pytest.raises(DiffMambaError):
        bootstrap_mean(v, clusters=g[:-1])
    with pytest.raises(DiffMambaError):
        bootstrap_mean(v, clusters=np.where(g == 0, np.nan, g))


def test_clusters_none_is_unchanged_and_singleton_clusters_equal_it():
    v = np.random.default_rng(2).normal(size=(40, 5))
    v[3, 2] = np.nan
    plain = bootstrap_mean(v, n_boot=500, seed=11)
    single = bootstrap_mean(v, n_boot=500, seed=11, clusters=np.arange(40))
    for f in ("mean", "median", "ci_low", "ci_high", "n", "n_clusters"):
        assert np.array_equal(getattr(plain, f), getattr(single, f), equal_nan=True), f
    assert np.array_equal(plain.n_clusters, plain.n)


def test_cluster_ci_is_wider_when_questions_in_a_story_are_identical():
    story_values = np.random.default_rng(4).normal(size=10)
    v = np.repeat(story_values, 5)  # 10 stories x 5 identical questions: 10 independent values, not 50
    stories = np.repeat(np.arange(10), 5)
    per_q = bootstrap_mean(v, n_boot=4000, seed=0)
    per_s = bootstrap_mean(v, n_boot=4000, seed=0, clusters=stories)
    width_q, width_s = per_q.ci_high - per_q.ci_low, per_s.ci_high - per_s.ci_low
    assert (width_s > 1.8 * width_q).all()  # about sqrt(5) = 2.24 times wider
    # with equal story sizes the cluster bootstrap is the bootstrap of the 10 story values, same draws
    stories_only = bootstrap_mean(story_values, n_boot=4000, seed=0)
    assert np.allclose(per_s.ci_low, stories_only.ci_low) and np.allclose(per_s.ci_high, stories_only.ci_high)
    assert np.allclose(per_s.mean, per_q.mean) and per_s.n.tolist() == [50] and per_s.n_clusters.tolist() == [10]


def test_bootstraps_are_seeded():
    v = np.random.default_rng(5).normal(size=(30, 2))
    cl = np.arange(30) % 6
    a = bootstrap_mean(v, n_boot=200, seed=1, clusters=cl)
    b = bootstrap_mean(v, n_boot=200, seed=1, clusters=cl)
    c = bootstrap_mean(v, n_boot=200, seed=2, clusters=cl)
    assert np.array_equal(a.ci_low, b.ci_low) and np.array_equal(a.ci_high, b.ci_high)
    assert not np.array_equal(a.ci_low, c.ci_low)
    g = bootstrap_mean(v, n_boot=200, seed=np.random.default_rng(1), clusters=cl)
    assert np.array_equal(g.ci_low, a.ci_low)  # a Generator seeded alike gives the same draws
    s1 = seed_level([v, v + 1], n_boot=200, seed=1, clusters=cl)
    s2 = seed_level([v, v + 1], n_boot=200, seed=1, clusters=cl)
    s3 = seed_level([v, v + 1], n_boot=200, seed=2, clusters=cl)
    assert np.array_equal(s1.ci_low, s2.ci_low) and not np.array_equal(s1.ci_low, s3.ci_low)


def test_degenerate_intervals_are_flagged_and_never_significant():
    const = bootstrap_mean(np.full(50, 0.5), n_boot=200)
    assert const.ci_low.tolist() == const.ci_high.tolist() == [0.5]  # "excludes 0" but zero width
    assert const.degenerate.all() and not const.significant.any()
    rng = np.random.default_rng(6)
    x = 1.0 + 0.1 * rng.normal(size=50)
    assert bootstrap_mean(x, n_boot=500).significant.all()
    one_story = bootstrap_mean(x, n_boot=500, clusters=np.zeros(50))  # one cluster: every resample alike
    assert one_story.degenerate.all() and not one_story.significant.any() and one_story.n_clusters.tolist() == [1]
    few = bootstrap_mean(x[:5], n_boot=500)
    assert not few.degenerate.any() and (few.ci_low > 0).all() and not few.significant.any()  # n = 5 < min_n
    assert bootstrap_mean(x[:5], n_boot=500, min_n=5).significant.all()
    in_stories = bootstrap_mean(x, n_boot=500, clusters=np.arange(50) // 10)  # 5 clusters < min_n
    assert (in_stories.ci_low > 0).all() and not in_stories.significant.any()
    straddles = bootstrap_mean(rng.normal(size=200) * 0.01 + np.where(np.arange(200) % 2, 1, -1), n_boot=500)
    assert not straddles.degenerate.any() and not straddles.significant.any()
    empty = bootstrap_mean(np.column_stack([x, np.full(50, np.nan)]), n_boot=100)
    assert empty.degenerate.tolist() == [False, True] and empty.significant.tolist() == [True, False]
    assert np.isnan(empty.ci_low[1]) and empty.n.tolist() == [50, 0]


# -- seed level -----------------------------------------------------------------------------------
def test_seed_level_two_seeds_with_known_means():
    rng = np.random.default_rng(8)
    g = np.repeat(np.arange(6), 4)
    x = rng.normal(size=(24, 2)) + g[:, None]
    seeds = [x, x + 2.0]  # seed means differ by exactly 2
    res = seed_level(seeds, n_boot=400, seed=9, clusters=g)
    assert np.allclose(res.mean, x.mean(0) + 1.0)
    assert np.allclose(res.seed_means[0], [x.mean(0), x.mean(0) + 2.0])
    assert np.allclose(res.seed_std[0], np.sqrt(2.0)) and res.n_seeds == (2,)
    assert res.n.tolist() == [24, 24] and res.n_clusters.tolist() == [6, 6]
    # by hand: the documented draws (clusters first, then seeds) and a loop over resamples
    draw = np.random.default_rng(9)
    cc, sc = resample_counts(6, 400, draw), resample_counts(2, 400, draw)
    loop = np.array([np.mean([np.repeat(seeds[s], row[g], axis=0).mean(0) for s in np.repeat([0, 1], srow)], axis=0)
                     for row, srow in zip(cc, sc)])
    assert np.allclose(res.ci_low, np.percentile(loop, 2.5, axis=0))
    assert np.allclose(res.ci_high, np.percentile(loop, 97.5, axis=0))
    # the seed spread widens the interval beyond the single-seed cluster bootstrap
    one = bootstrap_mean(x, n_boot=400, seed=9, clusters=g)
    assert ((res.ci_high - res.ci_low) > (one.ci_high - one.ci_low) + 1.0).all()


def test_seed_level_with_one_seed_is_the_cluster_bootstrap():
    v = np.random.default_rng(10).normal(size=(30, 3))
    v[4, 0] = np.nan
    g = np.arange(30) // 3
    for clusters in (None, g):
        s = seed_level([v], n_boot=300, seed=4, clusters=clusters)
        b = bootstrap_mean(v, n_boot=300, seed=4, clusters=clusters)
        for f in ("mean", "ci_low", "ci_high", "n", "n_clusters"):
            assert np.array_equal(getattr(s, f), getattr(b, f)), f
        assert np.isnan(s.seed_std[0]).all() and s.n_seeds == (1,)
    with pytest.raises(DiffMambaError):
        seed_level([v, v[:10]])
    with pytest.raises(DiffMambaError):
        seed_level([])


def test_seed_level_uses_examples_finite_in_every_seed():
    x = np.arange(10.0)
    y = x + 1.0
    y[0] = np.nan  # example 0 is missing in seed 2, so it is left out of seed 1's mean too
    res = seed_level([x, y], n_boot=100)
    assert res.n.tolist() == [9] and np.allclose(res.seed_means[0][:, 0], [5.0, 6.0])
    assert np.allclose(res.mean, 5.5)


def test_paired_seed_level_pairs_examples_not_seeds():
    rng = np.random.default_rng(12)
    g = np.repeat(np.arange(20), 3)
    x = 100 * rng.normal(size=(60, 2)) + 50 * g[:, None]  # huge example-to-example variance, shared
    a = [x + 0.0, x + 1.0]
    b = [x + 3.0, x + 3.5, x + 4.0]  # a different number of seeds
    res = paired_seed_level(a, b, n_boot=500, seed=0, clusters=g)
    assert np.allclose(res.mean, 3.0) and res.n_seeds == (2, 3)
    assert np.allclose(res.seed_std[0], np.sqrt(0.5)) and np.allclose(res.seed_std[1], 0.5)
    # the shared example draw cancels x: what is left is the seed draw, b in [3, 4] minus a in [0, 1]
    assert (res.ci_low >= 2.0 - 1e-9).all() and (res.ci_high <= 4.0 + 1e-9).all() and res.significant.all()
    # b's 3-seed mean minus a's 2-seed mean takes few values: check against a hand enumeration of the draws
    draw = np.random.default_rng(0)
    resample_counts(20, 500, draw)
    ca, cb = resample_counts(2, 500, draw), resample_counts(3, 500, draw)
    by_hand = 3.0 + cb @ np.array([0.0, 0.5, 1.0]) / 3 - ca @ np.array([0.0, 1.0]) / 2
    assert np.allclose(res.ci_low, np.percentile(by_hand, 2.5))
    assert np.allclose(res.ci_high, np.percentile(by_hand, 97.5))
    # one seed each: the paired (cluster) bootstrap of b - a
    d = rng.normal(size=x.shape)
    one = paired_seed_level([x], [x + d], n_boot=500, seed=0, clusters=g)
    pb = paired_bootstrap(x, x + d, n_boot=500, seed=0, clusters=g)
    assert np.allclose(one.mean, pb.mean) and np.allclose(one.ci_low, pb.ci_low)
    assert np.allclose(one.ci_high, pb.ci_high)
    with pytest.raises(DiffMambaError):
        paired_seed_level(a, [x[:10]])


# -- measures -------------------------------------------------------------------------------------
def test_log_odds_db_against_float64_math():
    ln10 = np.log(10)
    # p small: 1 - p is 1 (1e-300) or exact enough (1e-12) in float64, so the direct formula is the reference
    for p in (1e-300, 1e-12):
        expect = 10 * (np.log10(p) - np.log10(1 - p))
        assert np.isclose(log_odds_db(np.log(p)), expect, rtol=1e-13, atol=0)
    assert np.isclose(log_odds_db(np.log(1e-300)), -3000.0, rtol=1e-13)  # the old clamp said -120
    assert abs(log_odds_db(np.log(0.5))) < 1e-12
    # p = 1 - 1e-9 given as its log-probability: odds (1 - 1e-9) / 1e-9 -> 90 dB - 4.3e-9 dB
    lp = np.log1p(-1e-9)
    expect = 10 * (lp / ln10 + 9.0)
    assert np.isclose(log_odds_db(lp), expect, rtol=1e-13, atol=0)
    p = np.exp(lp)  # the naive route through p loses ~1e-7 of the relative precision of 1 - p
    assert abs(10 * np.log10(p / (1 - p)) - expect) > 1e-8
    # no floor below, a documented limit above, NaN through, shapes kept
    out = log_odds_db(np.array([[-1000.0, -np.inf], [np.nan, 0.0]]))
    assert out.shape == (2, 2)
    assert np.isclose(out[0, 0], -1000 * 10 / ln10) and out[0, 1] == -np.inf and np.isnan(out[1, 0])
    assert out[1, 1] == LOG_ODDS_DB_MAX and np.isclose(LOG_ODDS_DB_MAX, 10 * 1074 * np.log10(2))
    assert log_odds_db(-1e-20) > 190 and log_odds_db(-1e-20) < LOG_ODDS_DB_MAX  # logprob resolves past p's
    assert np.isclose(log_odds_db(np.log(1e-3)), -log_odds_db(np.log1p(-1e-3)), rtol=1e-12)
    with pytest.raises(DiffMambaError):
        log_odds_db([-1.0, 1e-6])


def test_log_ratio_and_log_mass():
    # p(target) = 0.5, candidates 0.1 and 0.2 (NaN = padding): ln(0.5 / 0.3)
    cands = np.log([[0.1, 0.2, np.nan], [np.nan, np.nan, np.nan], [0.3, np.nan, np.nan]])
    mass = log_mass(cands)
    assert np.allclose(mass[[0, 2]], np.log([0.3, 0.3])) and np.isnan(mass[1])
    r = log_ratio(np.log([0.5, 0.5, 0.5]), mass)
    assert np.allclose(r[[0, 2]], np.log(0.5 / 0.3)) and np.isnan(r[1])
    # candidates far below float64's range as probabilities: the log-sum-exp does not underflow
    deep = log_mass(np.array([-800.0, -801.0]))
    assert np.isclose(deep, -800.0 + np.log1p(np.exp(-1.0)))
    assert np.isclose(log_ratio(-1.0, deep), 799.0 - np.log1p(np.exp(-1.0)))
    assert log_mass(np.array([-np.inf, -np.inf])) == -np.inf and log_ratio(-1.0, -np.inf) == np.inf
    # per layer: candidates on the last axis of [n, layers, c]
    lp = np.log(np.full((2, 3, 4), 0.05))
    assert np.allclose(log_mass(lp), np.log(0.2)) and log_mass(lp).shape == (2, 3)
