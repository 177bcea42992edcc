"""README.md's shipped-model tables are the ones scripts/model_tables.py prints from the cards, and
that script reads the cards' numbers faithfully."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import model_tables  # noqa: E402  (scripts/ is not a package)


def test_readme_holds_the_tables_the_cards_give():
    readme = (ROOT / "README.md").read_text()
    assert model_tables.training_table() in readme
    assert model_tables.length_table() in readme


def test_training_table_reads_training_json():
    table = model_tables.training_table().splitlines()
    assert len(table) == 2 + 6  # three seeds of each architecture
    t = json.loads((ROOT / "models" / "diffmamba2-babi-seed2" / "training.json").read_text())
    qa1 = next(r["accuracy"] for r in t["accuracy"] if r["task"] == "qa1" and r["length"] == 0)
    row = next(line for line in table if line.startswith("| `diffmamba2-babi-seed2` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == str(t["d_state"]) and cells[3] == f"{t['n_params']:,}" and cells[5] == f"{qa1:.3f}"


def test_card_lengths_parses_the_eval_section(tmp_path):
    card = tmp_path / "m" / "README.md"
    card.parent.mkdir()
    card.write_text("# m\n\n" + model_tables.EVAL_HEADING + "\n\ntext\n\n| task | length | n | argmax | generation |\n"
                    "|---|---|---|---|---|\n| qa1 | 0 | 100 | 0.45 [0.36, 0.55] | 0.02 [0.01, 0.07] |\n"
                    "| qa2 | 0 | 100 | 0.31 [0.2, 0.4] | — |\n| qa1 | 4096 | 100 | 0.49 [0.39, 0.59] | — |\n")
    assert model_tables.card_lengths(card.parent) == {0: (0.45, 0.02), 4096: (0.49, None)}
    card.write_text("# m\n")
    with pytest.raises(SystemExit, match="no '## Accuracy by context length' section"):
        model_tables.card_lengths(card.parent)
