"""Print the README's shipped-model tables from the cards (maintenance script).

Usage: python scripts/model_tables.py

First table: each shipped model (`jobs.shipped_seed_checkpoints`: every seed of each architecture)
with its seed, state size, parameters, training minutes, test accuracy per task at 0k, their mean
and qa1 with filler (`train.target_values`), read from its training.json. Second table: qa1 accuracy
by context length per model, by argmax and by greedy generation, read from the "Accuracy by context length" section of its
card (`scripts/eval_to_cards.py`). tests/test_model_tables.py checks that README.md holds both
tables as printed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from eval_to_cards import HEADING as EVAL_HEADING  # scripts/ is on the path when run as a script

from diffmamba_interp.jobs import shipped_seed_checkpoints
from diffmamba_interp.train import TASKS, target_values


def shipped_models() -> list[Path]:
    """Every shipped checkpoint, by architecture then seed."""
    return [Path(p) for paths in shipped_seed_checkpoints().values() for p in paths]


def training_table() -> str:
    lines = ["| model | seed | d_state | parameters | minutes | " + " | ".join(TASKS) + " | mean qa1–5 | qa1 @ 1k |",
             "|---|---|---|---|---|" + "---|" * len(TASKS) + "---|---|"]
    for path in shipped_models():
        t = json.loads((path / "training.json").read_text())
        accuracy = pd.DataFrame(t["accuracy"])
        at_0k = accuracy[accuracy["length"] == 0].set_index("task")["accuracy"]
        got = target_values(accuracy)
        minutes = (t["wall_s"] + sum(e["wall_s"] for e in t["earlier"])) / 60
        cells = " | ".join(f"{at_0k[task]:.3f}" for task in TASKS)
        lines.append(f"| `{path.name}` | {t['seed']} | {t['d_state']} | {t['n_params']:,} | {minutes:.1f} | {cells} | "
                     f"{got['mean']:.3f} | {got['qa1 @ 1k']:.3f} |")
    return "\n".join(lines)


def card_lengths(path: Path, task: str = "qa1") -> dict[int, tuple[float, float | None]]:
    """{length in tokens: (argmax, generation accuracy or None where not scored)} of `task` from the card's
    accuracy-by-length table."""
    text = (path / "README.md").read_text()
    _, found, section = text.partition(EVAL_HEADING)
    if not found:
        raise SystemExit(f"{path.name}: the card has no '{EVAL_HEADING}' section (run scripts/eval_to_cards.py)")
    acc = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] == task:
            acc[int(cells[1])] = tuple(None if c == "—" else float(c.split()[0]) for c in cells[3:5])
    return acc


def length_table() -> str:
    accs = {path.name: card_lengths(path) for path in shipped_models()}
    lengths = sorted(set().union(*accs.values()))
    lines = ["| model | " + " | ".join(f"{x // 1024}k" for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name, acc in accs.items():
        lines.append(f"| `{name}` | " + " | ".join(" / ".join("—" if v is None else f"{v:.2f}" for v in acc[x]) for x in lengths) + " |")
    return "\n".join(lines)


def main() -> None:
    print(training_table())
    print()
    print(length_table())


if __name__ == "__main__":
    main()
