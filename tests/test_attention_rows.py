"""The answer row of every map of a layer (analysis/answer_row.py) and attention to the needle
(analysis/needle_attention.py)."""

import numpy as np
import pytest
import torch

from diffmamba_interp.analysis.answer_row import answer_row, answer_rows
from diffmamba_interp.analysis.attention import differential_summary, implicit_attention
from diffmamba_interp.analysis.needle_attention import (
    needle_attention, needle_shares, needle_token_mask, supporting_spans,
)
from diffmamba_interp.data import Prompt, babilong, load_data, paper_prompts
from diffmamba_interp.errors import DiffMambaError


@pytest.fixture(scope="module")
def make(tiny_model, tokenizer):
    """make(arch, dtype=float64): a tiny perturbed model with the bAbI tokenizer (layer 0 differential)."""

    def build(arch, dtype=torch.float64):
        model = tiny_model(arch, dtype=dtype, shared=True, vocab_size=len(tokenizer), d_state=4, head_dim=8,
                           chunk_size=256, d_conv=4, bias=True)
        model.tokenizer = tokenizer
        return model

    return build


def ids_(L=12, seed=1, V=40):
    return torch.randint(3, V, (2, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,layer", [("diffmamba2", 0), ("diffmamba2", 1), ("diffs6", 0), ("diffmamba1", 0),
                                        ("diffs6mamba2", 0)])
def test_answer_row_holds_each_maps_last_row(make, arch, layer):
    model, ids = make(arch), ids_()
    answer = torch.tensor([5, 9])
    row = answer_row(model, ids, layer, answer=answer)
    diff = layer == 0
    names = (["branch 1", "branch 2", "differential", "output norm", "output norm, branch 1", "output norm, branch 2",
              "logit", "logit, branch 1", "logit, branch 2"] if diff else ["layer", "output norm", "logit"])
    assert list(row.maps) == names and row.position == 11
    for name, r in row.maps.items():
        assert r.shape == (2, 12), name
    branches = ("branch 1", "branch 2") if diff else ("layer",)
    for k, name in enumerate(branches, start=1):
        want = implicit_attention(model, ids, layer, k if diff else None, kind="block", reduce="mean").matrix[:, -1]
        torch.testing.assert_close(row.maps[name], want, atol=1e-14, rtol=1e-12)
    if diff:
        torch.testing.assert_close(row.maps["differential"],
                                   differential_summary(model, ids, layer, kind="block", reduce="mean").matrix[:, -1],
                                   atol=1e-14, rtol=1e-12)
    op = implicit_attention(model, ids, layer, kind="output")
    torch.testing.assert_close(row.maps["output norm"], op.frobenius()[:, -1], atol=1e-14, rtol=1e-12)
    if diff:
        for k in (1, 2):
            torch.testing.assert_close(row.maps[f"output norm, branch {k}"], op.branch(k).frobenius()[:, -1],
                                       atol=1e-14, rtol=1e-12)
    # the logit rows: u is the answer logit's gradient through norm_f with its scale frozen, so
    # u·resid_post[last] is the answer's logit; Σ_s logit[s] + rest = u·mixer_out[last]
    logits, cache = model.run_with_cache(ids)
    f = model.norm_f
    u = model.lm_head.weight[answer] * f.weight * cache["norm_f.hook_scale"][:, -1]
    resid = cache[f"blocks.{len(model.blocks) - 1}.hook_resid_post"][:, -1]
    torch.testing.assert_close((u * resid).sum(-1), logits[torch.arange(2), -1, answer], atol=1e-12, rtol=0)
    direct = (u * cache[f"blocks.{layer}.hook_mixer_out"][:, -1]).sum(-1)
    torch.testing.assert_close(row.maps["logit"].sum(-1) + row.logit_rest, direct.detach(), atol=1e-12, rtol=0)
    if diff:
        torch.testing.assert_close(row.maps["logit, branch 1"] + row.maps["logit, branch 2"], row.maps["logit"],
                                   atol=1e-14, rtol=0)


def test_rows_of_all_layers_from_one_forward(make, monkeypatch):
    model, ids = make("diffmamba2"), ids_()
    calls = []
    orig = model.run_with_cache

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(model, "run_with_cache", spy)
    rows = answer_rows(model, ids, answer=4, position=6, kind="s6", reduce="absmean")
    assert len(calls) == 1 and list(rows) == [0, 1]
    for layer, r in rows.items():
        one = answer_row(model, ids, layer, answer=4, position=6, kind="s6", reduce="absmean")
        assert r.position == 6 and list(r.maps) == list(one.maps)
        for name in r.maps:
            torch.testing.assert_close(r.maps[name], one.maps[name], atol=1e-14, rtol=0)
        assert (r.maps["output norm"][:, 7:] == 0).all()  # nothing after the target position


def test_answer_row_errors(make):
    model, ids = make("mamba2"), ids_()
    with pytest.raises(DiffMambaError, match="reduce"):
        answer_row(model, ids, 0, reduce=None)
    with pytest.raises(DiffMambaError, match="kind"):
        answer_row(model, ids, 0, kind="output")
    with pytest.raises(DiffMambaError, match="answer"):
        answer_row(model, ids, 0, answer=10_000)
    with pytest.raises(DiffMambaError, match="out of range"):
        answer_row(model, ids, 0, position=12)
    with pytest.raises(DiffMambaError, match="out of range"):
        answer_row(model, ids, 5)


# -- the needle ---------------------------------------------------------------------------------
def test_supporting_spans_are_the_supporting_facts(tokenizer):
    prompts = (babilong("qa2", "0k", n=3) + babilong("qa2", "1k", n=3, tokenizer=tokenizer, filler="babi")
               + babilong("qa3", 600, n=2) + paper_prompts(["qa1"], per_task=2))
    for p in prompts:
        spans = supporting_spans(p)
        assert [p.prompt[a:b] for a, b in spans] == list(p.meta["supporting_facts"])
        if (p.meta.get("filler") or "").startswith("babi:"):  # one-period sentences: count them to check the
            context = p.prompt.index("\n") + 1  # occurrence found is the sentence the builder placed
            sentence = [p.prompt[context:a].count(". ") for a, _ in spans]
            assert sentence == [p.meta["fact_positions"][k] for k in p.meta["supporting"]]
    jp = Prompt("a b c d", "x", meta={"supporting_spans": [[2, 3]]})
    assert supporting_spans(jp) == [(2, 3)]
    with pytest.raises(DiffMambaError, match="supporting"):
        supporting_spans(Prompt("a b", "x", meta={"source": "jsonl"}))


def test_needle_token_mask_marks_the_facts_tokens(tokenizer):
    p = babilong("qa2", "1k", n=1, tokenizer=tokenizer, filler="babi")[0]
    mask = needle_token_mask(tokenizer, p.prompt, supporting_spans(p))
    toks = tokenizer.convert_ids_to_tokens(tokenizer.encode(p.prompt, add_special_tokens=False))
    assert len(toks) == mask.size
    marked = [t for t, m in zip(toks, mask) if m]
    assert marked == [w for f in p.meta["supporting_facts"] for w in tokenizer.tokenize(f)]


def test_needle_shares_are_the_rows_mass_on_the_needle(make, tokenizer):
    model = make("diffmamba2")
    p = babilong("qa2", "0k", n=1)[0]
    df = needle_shares(model, p, layers=[0])
    mask = torch.as_tensor(needle_token_mask(tokenizer, p.prompt, supporting_spans(p)))
    answer = tokenizer.encode(" " + p.answer, add_special_tokens=False)[0]
    row = answer_row(model, model.to_tokens(p.prompt), 0, answer=answer)
    assert list(df["map"]) == list(row.maps) and (df.layer == 0).all()
    for name, r in row.maps.items():
        mass = r[0].abs()
        got = df.loc[df["map"] == name, "share"].item()
        assert got == pytest.approx(float(mass[mask].sum() / mass.sum()), rel=1e-12)
        assert 0 <= got <= 1
    assert (df.baseline == float(mask.double().mean())).all()


def test_needle_attention_summary_and_paired(make, tokenizer):
    models = [make("mamba2"), make("diffmamba2")]
    prompts = load_data("babi:qa2", n=6, tokenizer=tokenizer)
    res = needle_attention(models, prompts, n_boot=200, labels=["mamba", "diff"])
    from_spec = needle_attention(models, "babi:qa2", n=6, n_boot=200, labels=["mamba", "diff"])  # the same examples
    assert from_spec.summary.equals(res.summary)
    per, summary, paired = res.per_example, res.summary, res.paired
    assert set(per.model) == {"mamba", "diff"} and per.example.nunique() == 6
    assert set(summary[summary.model == "diff"]["map"]) >= {"branch 1", "differential", "output norm", "logit"}
    for _, s in summary.iterrows():
        g = per[(per.model == s.model) & (per.layer == s.layer) & (per["map"] == s["map"])]
        assert s["mean"] == pytest.approx(g.share.mean()) and s.n == 6
        assert s.ci_low <= s["mean"] <= s.ci_high
        assert s.ratio == pytest.approx(s["mean"] / s.baseline)
    # paired: only maps both models have at a layer; b − a per example
    assert set(zip(paired.layer, paired["map"])) == {(0, "output norm"), (0, "logit"), (1, "layer"), (1, "output norm"),
                                                  (1, "logit")}
    for _, r in paired.iterrows():
        a = per[(per.model == "mamba") & (per.layer == r.layer) & (per["map"] == r["map"])].sort_values("example")
        b = per[(per.model == "diff") & (per.layer == r.layer) & (per["map"] == r["map"])].sort_values("example")
        assert r.diff_mean == pytest.approx(float(np.mean(b.share.to_numpy() - a.share.to_numpy())))
