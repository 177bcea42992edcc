"""Put an `eval --json` result into the model cards of the models it evaluated (maintenance script).

Usage: python scripts/eval_to_cards.py reports/eval.json

Each evaluated checkpoint's README.md gets (or has replaced) a section "## Accuracy by context length"
with its rows of the table: task, length, n, argmax accuracy and generation accuracy with their 95%
intervals, and the command that produced them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADING = "## Accuracy by context length"


def section(rows: list[dict], command: str) -> str:
    def cell(row, scorer):
        acc = row[f"accuracy_{scorer}"]
        if acc is None:
            return "—"
        return f"{acc:.2f} [{row[f'{scorer}_ci_low']:.2f}, {row[f'{scorer}_ci_high']:.2f}]"

    lines = [f"| {r['task']} | {r['length']} | {r['n']} | {cell(r, 'argmax')} | {cell(r, 'generate')} |" for r in rows]
    return f"""{HEADING}

BABILong prompts with the shipped books as filler (lengths in tokens of this model's tokenizer), scored
by argmax at the last prompt token and by greedy generation (upstream's `compare_answers`: the target
must be the only answer label in the first generated sentence); 95% story-clustered Wilson intervals.
`{command}`:

| task | length | n | argmax | generation |
|---|---|---|---|---|
""" + "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    result = json.loads(Path(argv[0]).read_text())
    command = result.get("command") or f"diffmamba-interp eval --data {' '.join(result['data']['specs'])} -n {result['data']['n']}"
    for model in result["models"]:
        card = Path(model["ckpt"]) / "README.md"
        rows = [r for r in result["accuracy"] if r["model"] == model["label"]]
        text = card.read_text()
        if HEADING in text:
            head, _, rest = text.partition(HEADING)
            after = rest.find("\n## ")
            text = head + (rest[after + 1:] if after >= 0 else "")
        card.write_text(text.rstrip("\n") + "\n\n" + section(rows, command))
        print(f"updated {card}")


if __name__ == "__main__":
    main(sys.argv[1:])
