"""Print the README's shipped-model tables from the cards (maintenance script).

Usage: python scripts/model_tables.py

First table: each model in models/ (seed 0 and the other seeds of each architecture) with its state
size, parameters, training minutes, test accuracy per task at 0k, their mean and qa1 at 1k tokens of
filler, read from its training.json. Second table: qa1 argmax accuracy by context length per model,
read from the "Accuracy by context length" section of its card (`scripts/eval_to_cards.py`).
tests/test_model_tables.py checks that README.md holds both tables as printed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval_to_cards import HEADING as EVAL_HEADING  # scripts/ is on the path when run as a script

MODELS = Path(__file__).resolve().parent.parent / "models"
ARCHS = ("mamba2", "diffmamba2")
SEEDS = (0, 1, 2)


def model_name(arch: str, seed: int) -> str:
    return f"{arch}-babi" + (f"-seed{seed}" if seed else "")


def training_table() -> str:
    lines = ["| model | seed | d_state | parameters | minutes | qa1 | qa2 | qa3 | qa4 | qa5 | mean qa1–5 | qa1 @ 1k |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch in ARCHS:
        for seed in SEEDS:
            name = model_name(arch, seed)
            t = json.loads((MODELS / name / "training.json").read_text())
            acc = {(r["task"], r["length"]): r["accuracy"] for r in t["accuracy"]}
            minutes = (t["wall_s"] + sum(e["wall_s"] for e in t["earlier"])) / 60
            q = [acc[(f"qa{i}", 0)] for i in range(1, 6)]
            cells = " | ".join(f"{v:.3f}" for v in q)
            lines.append(f"| `{name}` | {seed} | {t['d_state']} | {t['n_params']:,} | {minutes:.1f} | {cells} | "
                         f"{sum(q) / 5:.3f} | {acc[('qa1', 1024)]:.3f} |")
    return "\n".join(lines)


def card_lengths(name: str, task: str = "qa1") -> dict[int, float]:
    """{length in tokens: argmax accuracy} of `task` from the card's accuracy-by-length table."""
    text = (MODELS / name / "README.md").read_text()
    _, found, section = text.partition(EVAL_HEADING)
    if not found:
        raise SystemExit(f"{name}: the card has no '{EVAL_HEADING}' section (run scripts/eval_to_cards.py)")
    acc = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] == task:
            acc[int(cells[1])] = float(cells[3].split()[0])
    return acc


def length_table() -> str:
    names = [model_name(arch, seed) for arch in ARCHS for seed in SEEDS]
    accs = {name: card_lengths(name) for name in names}
    lengths = sorted(set().union(*accs.values()))
    lines = ["| model | " + " | ".join(f"{x // 1024}k" for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name in names:
        lines.append(f"| `{name}` | " + " | ".join(f"{accs[name][x]:.2f}" for x in lengths) + " |")
    return "\n".join(lines)


def main() -> None:
    print(training_table())
    print()
    print(length_table())


if __name__ == "__main__":
    main()
