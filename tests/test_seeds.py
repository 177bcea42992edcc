"""Several checkpoints per architecture: seed-level statistics and their paired comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffmamba_interp.analysis.seeds import SEED_PAIRED_COLUMNS, SEED_SUMMARY_COLUMNS, compare_seeds
from diffmamba_interp.analysis.stats import bootstrap_mean
from diffmamba_interp.cli import app
from diffmamba_interp.data import load_data
from diffmamba_interp.errors import DiffMambaError


@pytest.fixture(scope="module")
def seeds(tiny_model, tokenizer, tmp_path_factory):
    """Three Mamba-2 and two Diff-Mamba-2 tiny checkpoints (training seeds stand-ins: other inits)."""
    root = tmp_path_factory.mktemp("seeds")
    paths = {"mamba2": [], "diffmamba2": []}
    for arch, n in (("mamba2", 3), ("diffmamba2", 2)):
        for k in range(n):
            model = tiny_model(arch, seed=10 + k, vocab_size=len(tokenizer), d_model=32, head_dim=16, d_state=8)
            model.tokenizer = tokenizer
            path = root / f"{arch}-seed{k}"
            model.save_pretrained(path)
            paths[arch].append(path)
    return root, paths


def test_seed_level_summary_and_pairing(seeds):
    _, paths = seeds
    prompts = load_data("babi:qa1", n=12, seed=0)
    res = compare_seeds({"mamba2": paths["mamba2"], "diffmamba2": paths["diffmamba2"]}, prompts, lens="logit",
                        n_boot=200, progress=False)
    assert list(res.summary.columns) == list(SEED_SUMMARY_COLUMNS) and list(res.paired.columns) == list(SEED_PAIRED_COLUMNS)
    pe = res.per_example
    for group, members in res.groups.items():
        rows = res.summary[(res.summary.group == group) & (res.summary.measure == "prob")]
        # the seed-level mean is the mean over seeds of each seed's mean over examples
        per_seed = pe[(pe.group == group)].groupby(["model", "layer"]).prob.mean().unstack()
        np.testing.assert_allclose(rows["mean"].to_numpy(), per_seed.mean(0).to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(rows["seed_std"].to_numpy(), per_seed.std(0, ddof=1).to_numpy(), rtol=1e-9)
        assert (rows.n_seeds == len(members)).all() and (rows.n == 12).all()
        assert (rows.ci_low <= rows["mean"] + 1e-12).all() and (rows["mean"] <= rows.ci_high + 1e-12).all()
    stories = pe.drop_duplicates("example").story.nunique()
    assert (res.summary.n_clusters <= stories).all() and stories < 12  # questions share stories
    diff = res.paired[res.paired.measure == "prob"].set_index("layer").diff_mean
    means = res.summary[res.summary.measure == "prob"].pivot(index="layer", columns="group", values="mean")
    np.testing.assert_allclose(diff.to_numpy(), (means["diffmamba2"] - means["mamba2"]).to_numpy(), rtol=1e-9, atol=1e-15)


def test_one_seed_is_the_cluster_bootstrap(seeds):
    _, paths = seeds
    prompts = load_data("babi:qa1", n=10, seed=1)
    res = compare_seeds({"a": paths["mamba2"][:1]}, prompts, lens="logit", n_boot=300, progress=False)
    pe = res.per_example
    wide = pe.pivot(index="example", columns="layer", values="prob").to_numpy()
    clusters = pe.drop_duplicates("example").sort_values("example").story.astype(str).to_numpy()
    expected = bootstrap_mean(wide, n_boot=300, clusters=clusters)
    got = res.summary[res.summary.measure == "prob"]
    np.testing.assert_allclose(got.ci_low, expected.ci_low)
    np.testing.assert_allclose(got.ci_high, expected.ci_high)
    with pytest.raises(DiffMambaError, match="at least one checkpoint"):
        compare_seeds({"a": []}, prompts)


def test_cli_seed_groups_with_globs(seeds, tmp_path):
    root, _ = seeds
    out = tmp_path / "seeds.json"
    result = CliRunner().invoke(app, ["snr", "--ckpt-a", str(root / "mamba2-seed*"), "--ckpt-b", str(root / "diffmamba2-seed*"),
                                      "--n", "6", "--lens", "logit", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [g["name"] for g in doc["groups"]] == ["mamba2", "diffmamba2"]
    assert [len(g["ckpts"]) for g in doc["groups"]] == [3, 2] and doc["paired"][0]["n_seeds_a"] == 3
    bad = CliRunner().invoke(app, ["snr", "--ckpt-a", str(root / "nothing*"), "--ckpt-b", str(root / "mamba2-seed0")])
    assert bad.exit_code == 2 and "no checkpoint directory matches" in bad.output
