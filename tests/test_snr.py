"""Target probabilities, SNR, bootstrap summaries and model comparison (docs/conventions.md, "Lens and SNR")."""

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from diffmamba_interp.analysis.compare import PAIRED_COLUMNS, compare
from diffmamba_interp.analysis.lens import Lens, TunedLens
from diffmamba_interp.analysis.snr import MEASURES, SUMMARY_COLUMNS, TARGET_COLUMNS, snr_summary, target_probs
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


def test_rank_snr_and_distractors_with_a_hand_made_distribution(model, tokenizer):
    V = model.cfg.vocab_size
    t, c1, c2 = first_id(tokenizer, "kitchen"), first_id(tokenizer, "garden"), first_id(tokenizer, "office")
    logits = torch.full((V,), -1e4)
    logits[[t, c1, c2]] = torch.log(torch.tensor([4.0, 2.0, 1.0]))
    cands = [["garden", "office", "garden", "kitchen"]]  # duplicate and the answer itself count once / not at all
    df = target_probs(model, PROMPTS[:1], ["kitchen"], lens=FixedLens(logits), candidates=cands, progress=False)
    assert np.allclose(df.prob, 4 / 7) and (df["rank"] == 1).all()
    assert np.allclose(df.distractor_ratio, 4 / 3) and np.allclose(df.distractor_log_ratio, np.log(4 / 3))
    assert np.allclose(df.snr_db, 10 * np.log10((4 / 7) / (3 / 7)))
    df = target_probs(model, PROMPTS[:1], ["garden"], lens=FixedLens(logits), candidates=cands, progress=False)
    assert (df["rank"] == 2).all() and np.allclose(df.distractor_ratio, 2 / 5)
    # no floor at small p (the old clamp put every p < 1e-12 at −120 dB), float64 near p = 1
    for p_target in (1e-30, 1e-13, 1 - 1e-9):
        rest = np.log((1 - p_target) / (V - 1))
        logits64 = torch.full((V,), rest, dtype=torch.float64)
        logits64[t] = np.log(p_target)
        df = target_probs(model, PROMPTS[:1], ["kitchen"], lens=FixedLens(logits64), progress=False)
        assert np.allclose(df.snr_db, 10 * np.log10(p_target / (1 - p_target)), rtol=1e-6), p_target
    spike = torch.full((V,), -1e4)
    spike[t] = 0.0  # p(target) = 1 to float64 precision: saturated at the float64 limit, still finite
    df = target_probs(model, PROMPTS[:1], ["kitchen"], lens=FixedLens(spike), progress=False)
    assert np.isfinite(df.snr_db).all() and (df.snr_db > 3000).all()


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
        mine = together[together.example == i].drop(columns=["example", "story"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, one.drop(columns=["example", "story"]), check_exact=False, atol=1e-12, rtol=0)


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
    assert set(s1.model) == {"model"} and len(s1) == 3 * len(MEASURES)
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


def test_story_clusters_drive_the_bootstrap(model):
    from types import SimpleNamespace

    stories = ["s1", "s1", "s1", "s2", "s2", "s3"]
    objs = [SimpleNamespace(prompt=p, answer=a, candidates=tuple(c), meta={"story": s})
            for p, a, c, s in zip(PROMPTS, ANSWERS, CANDIDATES, stories)]
    df = target_probs(model, objs, progress=False)
    assert df.groupby("example").story.first().tolist() == stories
    by_story = snr_summary(df, n_boot=200, measures=["prob"])
    by_question = snr_summary(df, n_boot=200, measures=["prob"], bootstrap="question")
    assert (by_story.n_clusters == 3).all() and (by_question.n_clusters == 6).all() and (by_story.n == 6).all()
    wide = df.pivot(index="example", columns="layer", values="prob").to_numpy()
    expected = bootstrap_mean(wide, n_boot=200, clusters=np.array(stories))
    np.testing.assert_allclose(by_story.ci_low, expected.ci_low)
    np.testing.assert_allclose(by_story["mean"], expected.mean)
    assert not by_story.significant.any()  # 3 stories < min_n = 10: never called significant
    with pytest.raises(DiffMambaError, match="bootstrap"):
        snr_summary(df, bootstrap="seeds")


def test_paper_layer_is_the_index_of_hf_hidden_states(perturb):
    """The paper's layer k reads HF `hidden_states[k]` (no embedding entry for Mamba-2): our layer k + 1."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from diffmamba_interp import HookedMamba
    from diffmamba_interp.analysis.lens import lens_layers
    from diffmamba_interp.loading.hf import read_hf_config
    from diffmamba_interp.loading.keys import KEYS

    torch.manual_seed(0)
    hf = perturb(Mamba2ForCausalLM(Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=3,
                                                head_dim=16, num_heads=4, n_groups=1, expand=2, chunk_size=8))).eval()
    ours = HookedMamba(read_hf_config(hf.config.to_dict()))
    ours.load_state_dict(KEYS.to_ours(hf.state_dict())[0])
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
        _, cache = ours.run_with_cache(ids)
    df = target_probs(ours.eval(), [ids[0]], [3], progress=False)
    names = lens_layers(ours)
    for _, row in df.iterrows():
        if pd.isna(row.paper_layer):
            assert row.layer == 0
            continue
        k = int(row.paper_layer)  # hidden_states[k] = the residual after block k = our layer k + 1
        torch.testing.assert_close(cache[names[row.layer]], hidden[k], rtol=1e-4, atol=1e-4)
    # the paper's last index (n_layers) is the normed output, which the logit lens at our last layer reads
    assert len(hidden) == ours.cfg.n_layers + 1
    torch.testing.assert_close(cache["norm_f.hook_normalized"], hidden[-1], rtol=1e-4, atol=1e-4)
