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
        assert f"steps: {training['steps']}" in card and f"seed: {training['seed']}" in card
        for row in training["accuracy"]:
            length = "0k" if row["length"] == 0 else f"{row['length']} tokens"
            assert f"| {row['task']} | {length} | {row['n']} | {row['accuracy']:.3f} |" in card


def test_reported_qa1_accuracy_is_real_and_above_half(models):
    for path, model in zip(MODELS, models):
        card_acc = {r["task"]: r["accuracy"] for r in json.loads((path / "training.json").read_text())["accuracy"]}
        assert card_acc["qa1"] >= 0.5
        with torch.no_grad():
            acc = evaluate(model, model.tokenizer, tasks=("qa1",), n=200, progress=False)
        measured = float(acc.accuracy.iloc[0])
        assert measured >= 0.5
        assert abs(measured - card_acc["qa1"]) < 0.1  # first 200 questions vs all 1000


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
