"""The shipped default: two trained checkpoints (Mamba-2 vs Diff-Mamba-2) and the example reports."""

import json
from pathlib import Path

import pytest
import torch

from browser import check_page_in_chromium, find_chromium
from diffmamba_interp import TunedLens, load_model
from diffmamba_interp.jobs import SHIPPED, models_dir
from diffmamba_interp.train import evaluate

ROOT = Path(__file__).resolve().parent.parent
MODELS = [ROOT / "models" / name for name in SHIPPED]
pytestmark = pytest.mark.skipif(not all((p / "config.json").exists() for p in MODELS),
                                reason="shipped models not trained yet (make models)")


@pytest.fixture(scope="module")
def models():
    return [load_model(p) for p in MODELS]


def test_default_checkpoints_are_the_shipped_pair():
    assert [p.name for p in MODELS] == ["mamba2-babi", "diffmamba2-babi"]
    assert models_dir() == ROOT / "models"


def test_same_depth_width_and_params_within_5_percent(models):
    mamba, diff = models
    assert (mamba.cfg.arch, diff.cfg.arch) == ("mamba2", "diffmamba2")
    assert (mamba.cfg.n_layers, mamba.cfg.d_model) == (diff.cfg.n_layers, diff.cfg.d_model)
    n = [sum(p.numel() for p in m.parameters()) for m in models]
    assert abs(n[1] - n[0]) / n[0] <= 0.05


def test_every_checkpoint_has_tokenizer_lens_and_card(models):
    for path, model in zip(MODELS, models):
        assert model.tokenizer is not None
        lens = TunedLens.load(path, model)
        assert any(float(p.abs().sum()) > 0 for p in lens.translators.parameters())  # trained, not identity
        card = (path / "README.md").read_text()
        training = json.loads((path / "training.json").read_text())
        steps = training["steps"] + sum(stage["steps"] for stage in training["earlier"])
        assert f"steps: {steps}" in card and f"seed: {training['seed']}" in card
        for row in training["accuracy"]:
            length = "0k" if row["length"] == 0 else f"{row['length']} tokens"
            assert f"| {row['task']} | {length} | {row['n']} | {row['accuracy']:.3f} |" in card


def test_reported_accuracy_is_real(models):
    for path, model in zip(MODELS, models):
        card = {(r["task"], r["length"]): r for r in json.loads((path / "training.json").read_text())["accuracy"]}
        assert card[("qa1", 0)]["n"] == 1000 and card[("qa1", 1024)]["n"] == 1000  # the whole test split
        with torch.no_grad():
            acc = evaluate(model, model.tokenizer, tasks=("qa1",), n=200, progress=False)
        measured = float(acc.accuracy.iloc[0])
        assert measured > 0.3  # well above chance (about 1/6)
        assert abs(measured - card[("qa1", 0)]["accuracy"]) < 0.1  # first 200 questions vs all 1000


def seed_dirs():
    return sorted(p for p in (ROOT / "models").iterdir() if p.is_dir() and not p.name.startswith("."))


def test_three_seeds_per_architecture_one_tokenizer_and_small():
    from diffmamba_interp.data.subword import build_subword_tokenizer

    names = [p.name for p in seed_dirs()]
    for base in SHIPPED:
        assert [n for n in names if n == base or n.startswith(base + "-seed")] == [base, f"{base}-seed1", f"{base}-seed2"]
    vocab = build_subword_tokenizer().get_vocab()
    for path in seed_dirs():
        training = json.loads((path / "training.json").read_text())
        seed = 0 if "-seed" not in path.name else int(path.name.rsplit("seed", 1)[1])
        assert training["seed"] == seed and training["steps"] == json.loads((MODELS[0] / "training.json").read_text())["steps"]
        assert json.loads((path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
        model = load_model(path)
        assert model.tokenizer.get_vocab() == vocab  # every model reads the tokenizer `make models` builds
        TunedLens.load(path, model)  # its own lens (the fingerprint is checked on load)
    size = sum(f.stat().st_size for p in seed_dirs() for f in p.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"models/ holds {size / 2**20:.1f} MB"


@pytest.mark.parametrize("name", ["report.html"])
def test_committed_reports_render_offline_in_chromium(name):
    page = ROOT / "reports" / name
    assert page.exists(), f"{page} missing (make demo / diffmamba-interp report)"
    if find_chromium() is None:
        pytest.skip("no chromium binary (Debian package chromium) on this machine")
    result = check_page_in_chromium(page)
    assert result["errors"] == []
    assert result["external_requests"] == []
    assert result["drawn"] == result["plots"] and result["plots"] >= 4
