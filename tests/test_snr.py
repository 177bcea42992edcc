"""Target probabilities, SNR, bootstrap summaries and model comparison (docs/conventions.md, "Lens and SNR")."""

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from diffmamba_interp.analysis.compare import PAIRED_COLUMNS, compare
from diffmamba_interp.analysis.lens import Lens, TunedLens
from diffmamba_interp.analysis.snr import SUMMARY_COLUMNS, TARGET_COLUMNS, snr_summary, target_probs
from diffmamba_interp.analysis.stats import bootstrap_mean, paired_bootstrap, resample_counts
from diffmamba_interp.config import ARCHS
from diffmamba_interp.errors import DiffMambaError

SIZES = dict(d_model=32, head_dim=16, d_state=8, chunk_size=256, d_conv=4)


@pytest.fixture(scope="module")
def make_model(tiny_model):
    """make_model(arch, n_layers, vocab=50, seed=0, dtype=float64): a tiny perturbed model of this module's sizes."""
    return lambda arch, n_layers, vocab=50, seed=0, dtype=torch.float64: tiny_model(
        arch, seed=seed, dtype=dtype, n_layers=n_layers, vocab_size=vocab, **SIZES).train()


PROMPTS = [
    "Mary went to the kitchen . John moved to the garden . Where is Mary ?",
    "Sandra went to the office . Where is Sandra ?",
    "John went to the hallway . Mary moved to the bedroom . Where is John ?",
    "Daniel moved to the garden . Where is Daniel ?",
    "Sandra moved to the bathroom . Daniel went to the kitchen . Where is Sandra ?",
    "John moved to the office . Where is John ?",
]
ANSWERS = ["kitchen", "office", "hallway", "garden", "bathroom", "office"]
CANDIDATES = [["garden"], [], ["bedroom"], [], ["kitchen"], []]


@pytest.fixture(scope="module")
def model(make_model, tokenizer):
    m = make_model("diffmamba2", n_layers=2, vocab=len(tokenizer), seed=3)
    m.tokenizer = tokenizer
    return m


def first_id(tok, word):
    return tok.encode(" " + word, add_special_tokens=False)[0]


class FixedLens(Lens):
    """Every layer gives the same logits (a hand-made distribution)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def transform(self, h, layer):
        return h

    def forward(self, h, layer, model=None):
        return self.logits.to(h.dtype).expand(*h.shape[:-1], -1)


def test_target_probs_matches_a_direct_softmax(model, tokenizer):
    df = target_probs(model, PROMPTS[:3], ANSWERS[:3], progress=False)
    K = model.cfg.n_layers + 1
    assert list(df.columns) == list(TARGET_COLUMNS) and len(df) == 3 * K
    ids = torch.tensor([tokenizer.encode(PROMPTS[1], add_special_tokens=False)])
    _, cache = model.run_with_cache(ids)
    t = first_id(tokenizer, "office")
    names = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    for k, name in enumerate(names):
        with torch.no_grad():
            p = torch.softmax(model.unembed(cache[name][0, -1]), -1)
        row = df[(df.example == 1) & (df.layer == k)].iloc[0]
        assert row.prob == pytest.approx(float(p[t]), abs=1e-10)
        assert row.logprob == pytest.approx(float(torch.log(p[t])), abs=1e-8)
        assert row["rank"] == 1 + int((p > p[t]).sum())
        assert row.snr_db == pytest.approx(10 * np.log10(row.prob / (1 - row.prob)), abs=1e-9)
        assert row.target == "office" and row.n_target_tokens == 1
    assert df[df.example == 1].distractor_ratio.isna().all()  # no candidates given


def test_rank_and_snr_clamp_with_a_hand_made_distribution(model, tokenizer):
    V = model.cfg.vocab_size
    t, c1, c2 = first_id(tokenizer, "kitchen"), first_id(tokenizer, "garden"), first_id(tokenizer, "office")
    logits = torch.full((V,), -1e4)
    logits[[t, c1, c2]] = torch.log(torch.tensor([4.0, 2.0, 1.0]))
    cands = [["garden", "office", "garden", "kitchen"]]  # duplicate and the answer itself count once / not at all
    df = target_probs(model, PROMPTS[:1], ["kitchen"], lens=FixedLens(logits), candidates=cands, progress=False)
    assert np.allclose(df.prob, 4 / 7) and (df["rank"] == 1).all()
    assert np.allclose(df.distractor_ratio, 4 / 3)
    assert np.allclose(df.snr_db, 10 * np.log10((4 / 7) / (3 / 7)))
    df = target_probs(model, PROMPTS[:1], ["garden"], lens=FixedLens(logits), candidates=cands, progress=False)
    assert (df["rank"] == 2).all() and np.allclose(df.distractor_ratio, 2 / 5)
    spike = torch.full((V,), -1e4)
    spike[t] = 0.0  # p(target) = 1 exactly -> clamped to 1 − 1e-12
    df = target_probs(model, PROMPTS[:1], ["kitchen"], lens=FixedLens(spike), progress=False)
    assert np.allclose(df.snr_db, 10 * np.log10((1 - 1e-12) / 1e-12)) and np.isfinite(df.snr_db).all()


def test_multi_token_answer_warns_once_and_empty_answer_raises(model, tokenizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = target_probs(model, PROMPTS[:3], ["kitchen garden", "office bedroom", "hallway"], progress=False)
    mine = [w for w in caught if "several tokens" in str(w.message)]
    assert len(mine) == 1 and "2 of 3" in str(mine[0].message)
    assert df.groupby("example").n_target_tokens.first().tolist() == [2, 2, 1]
    single = target_probs(model, PROMPTS[:1], ["kitchen"], progress=False)
    assert np.allclose(df[df.example == 0].prob.values, single.prob.values)  # target = first token
    with pytest.raises(DiffMambaError, match="produces no tokens"):
        target_probs(model, PROMPTS[:2], ["kitchen", ""], progress=False)


def test_grouping_by_length_matches_one_at_a_time(model):
    together = target_probs(model, PROMPTS, ANSWERS, candidates=CANDIDATES, batch_size=2, progress=False)
    assert together.example.tolist() == sorted(together.example)
    for i, (p, a, c) in enumerate(zip(PROMPTS, ANSWERS, CANDIDATES)):
        one = target_probs(model, [p], [a], candidates=[c], progress=False)
        mine = together[together.example == i].drop(columns="example").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, one.drop(columns="example"), check_exact=False, atol=1e-12, rtol=0)


def test_prompt_objects_and_tuned_lens_resolution(model):
    from types import SimpleNamespace

    objs = [SimpleNamespace(prompt=p, answer=a, candidates=tuple(c)) for p, a, c in zip(PROMPTS[:2], ANSWERS, CANDIDATES)]
    via_objs = target_probs(model, objs, progress=False)
    direct = target_probs(model, PROMPTS[:2], ANSWERS[:2], candidates=CANDIDATES[:2], progress=False)
    pd.testing.assert_frame_equal(via_objs, direct)
    with pytest.raises(DiffMambaError, match="tuned lens"):
        target_probs(model, PROMPTS[:1], ANSWERS[:1], lens="tuned", progress=False)
    model.tuned_lens = TunedLens(model)  # identity at init = the logit lens
    try:
        tuned = target_probs(model, PROMPTS[:2], ANSWERS[:2], lens="tuned", candidates=CANDIDATES[:2], progress=False)
    finally:
        del model.tuned_lens
    pd.testing.assert_frame_equal(tuned, direct, check_exact=False, atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_target_probs_every_arch(make_model, arch):
    m = make_model(arch, n_layers=2, dtype=torch.float32)
    ids = [torch.tensor([3, 8, 1, 9]), torch.tensor([5, 2, 7])]
    df = target_probs(m, ids, [7, 11], candidates=[[2, 4], [3]], progress=False)
    assert len(df) == 2 * 3 and set(df.layer) == {0, 1, 2}
    assert ((df.prob > 0) & (df.prob < 1)).all() and np.allclose(np.exp(df.logprob), df.prob)
    assert df["rank"].between(1, 50).all() and np.isfinite(df.distractor_ratio).all()


# -- bootstrap -----------------------------------------------------------------------------------
def test_bootstrap_is_vectorised_resampling_of_the_mean():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(30, 4))
    v[3, 1] = np.nan
    counts = resample_counts(30, 200, seed=5)
    assert counts.shape == (200, 30) and (counts.sum(1) == 30).all()
    res = bootstrap_mean(v, n_boot=200, seed=5)
    # the same resamples, one at a time
    loop = np.array([[np.nanmean(np.repeat(v[:, j], row)) for j in range(4)] for row in counts])
    assert np.allclose(res.ci_low, np.percentile(loop, 2.5, axis=0))
    assert np.allclose(res.ci_high, np.percentile(loop, 97.5, axis=0))
    assert np.allclose(res.mean, np.nanmean(v, 0)) and res.n.tolist() == [30, 29, 30, 30]
    assert ((res.ci_low <= res.mean) & (res.mean <= res.ci_high)).all()
    b = v + 0.5
    pr = paired_bootstrap(v, b, n_boot=200, seed=5)
    assert np.allclose(pr.mean[[0, 2, 3]], 0.5) and np.allclose(pr.ci_low[[0, 2, 3]], 0.5)  # constant shift
    with pytest.raises(DiffMambaError):
        paired_bootstrap(v, v[:5])


def test_snr_summary_schema_ci_and_seed(model):
    df = target_probs(model, PROMPTS, ANSWERS, candidates=CANDIDATES, progress=False)
    s1 = snr_summary(df, n_boot=300, seed=0)
    s2 = snr_summary(df, n_boot=300, seed=0)
    s3 = snr_summary(df, n_boot=300, seed=1)
    assert list(s1.columns) == list(SUMMARY_COLUMNS)
    pd.testing.assert_frame_equal(s1, s2)
    assert not np.allclose(s1.ci_low, s3.ci_low)
    assert set(s1.model) == {"model"} and len(s1) == 3 * 5
    assert s1.measure.tolist()[:5] == ["prob", "logprob", "rank", "snr_db", "distractor_ratio"]
    assert ((s1.ci_low <= s1["mean"] + 1e-12) & (s1["mean"] <= s1.ci_high + 1e-12)).all()
    for layer in range(3):
        sub = df[df.layer == layer]
        row = s1[(s1.layer == layer) & (s1.measure == "prob")].iloc[0]
        assert row["mean"] == pytest.approx(sub.prob.mean()) and row["median"] == pytest.approx(sub.prob.median())
        dr = s1[(s1.layer == layer) & (s1.measure == "distractor_ratio")].iloc[0]
        assert dr["mean"] == pytest.approx(sub.distractor_ratio.dropna().mean())  # NaN rows left out


# -- compare -------------------------------------------------------------------------------------
def test_compare_paired_difference(make_model, model, tokenizer):
    other = make_model("mamba2", n_layers=2, vocab=len(tokenizer), seed=4)
    other.tokenizer = tokenizer
    deep = make_model("mamba2", n_layers=3, vocab=len(tokenizer), seed=4)
    deep.tokenizer = tokenizer
    res = compare([other, model, deep], PROMPTS, ANSWERS, candidates=CANDIDATES, n_boot=300, progress=False)
    assert res.labels == ["mamba2_1", "diffmamba2", "mamba2_2"]
    assert list(res.paired.columns) == list(PAIRED_COLUMNS) and list(res.summary.columns) == list(SUMMARY_COLUMNS)
    assert set(zip(res.paired.model_a, res.paired.model_b)) == {("mamba2_1", "diffmamba2")}
    assert len(res.notes) == 2 and all("different depths" in n for n in res.notes)
    assert set(res.per_example.model) == set(res.labels) and len(res.per_example) == 6 * (3 + 3 + 4)
    mean = res.summary.set_index(["model", "layer", "measure"])["mean"]
    for _, row in res.paired.iterrows():
        if row.measure == "distractor_ratio":
            continue  # NaN for examples without candidates; compared on shared examples
        expected = mean["diffmamba2", row.layer, row.measure] - mean["mamba2_1", row.layer, row.measure]
        assert row.diff_mean == pytest.approx(expected, abs=1e-9)
        assert row.ci_low <= row.diff_mean + 1e-12 <= row.ci_high + 2e-12
    assert len(res.difference(1, "prob")) == 1
    again = compare([other, model], PROMPTS, ANSWERS, labels=["A", "B"], candidates=CANDIDATES, n_boot=300,
                    progress=False)
    assert set(again.paired.model_a) == {"A"} and again.notes == []
    pd.testing.assert_frame_equal(again.paired.drop(columns=["model_a", "model_b"]),
                                  res.paired.drop(columns=["model_a", "model_b"]))


def test_compare_paths_load_the_tuned_lens(model, tmp_path, monkeypatch):
    lens = TunedLens(model)
    with torch.no_grad():
        lens.translators[0].bias.normal_(0, 0.5)
    lens.save(tmp_path / "ckpt")
    (tmp_path / "bare").mkdir()
    monkeypatch.setattr(model, "checkpoint_path", None)  # restored after the test
    monkeypatch.setattr(sys.modules["diffmamba_interp.analysis.compare"], "load_model",
                        lambda path: (setattr(model, "checkpoint_path", str(path)), model)[1])
    res = compare([tmp_path / "ckpt"], PROMPTS[:3], ANSWERS[:3], lens="tuned", n_boot=100, progress=False)
    assert res.labels == ["ckpt"] and res.paired.empty
    direct = target_probs(model, PROMPTS[:3], ANSWERS[:3], lens=lens, progress=False)
    np.testing.assert_allclose(res.per_example.prob, direct.prob, atol=1e-12)
    logit = target_probs(model, PROMPTS[:3], ANSWERS[:3], progress=False)
    assert not np.allclose(res.per_example[res.per_example.layer == 0].prob, logit[logit.layer == 0].prob)
    with pytest.raises(DiffMambaError, match="no tuned lens"):
        compare([tmp_path / "bare"], PROMPTS[:1], ANSWERS[:1], lens="tuned", progress=False)
