"""The paper's SNR evaluation set (Diff-Mamba, Fig. 6), rebuilt from the shipped bAbI test files.

Upstream (github.com/NadavSc/Diff-Mamba, ``tuned-lens/test_babilong_0k.py``; the same selection is
``preprocess_babilong`` in ``finetune_needle.py`` and ``retrieval/babilong/scripts/run_model_on_babilong.py``):

1. ``load_dataset("RMT-team/babilong-1k-samples", "0k")``: BABILong at length 0 (no filler), one
   split per task qa1..qa20. That dataset is the bAbI *test* file of each task (en, 1,000 questions),
   one row per question in file order, with ``input`` = the story's facts before the question
   joined by single spaces, ``question`` = the question exactly as the file has it (several tasks
   end it with a space, kept), ``target`` = the answer. Its rows per task (`UPSTREAM_0K_ROWS`): 1000
   for qa1 and qa6-qa10, 999 for qa2-qa5 and qa11-qa20, whose last question is missing (BABILong's
   ``TaskDataset.__len__`` returns the largest sample number, one less than the count).
2. For i in 1..20, the last 100 rows of ``qa{i}`` (``[-100:]``), concatenated in task order
   (2,000 rows): for qa1 questions 900..999 of the test file, for qa2 899..998.
3. ``Dataset.shuffle(seed=42)`` (Hugging Face ``datasets``): the row order
   ``numpy.random.default_rng(42).permutation(2000)``.
4. Text ``f'<context> \\n{input}\\n</context>\\n\\nQuestion: {question} Answer:'``; target token: the
   first token of ``' ' + target``; examples are read in that order, the first ``num_examples``.

Verified against upstream's own results: the 100 (target, question) rows of its qa1..qa5 ``0k``
evaluation CSVs (``retrieval/babilong/scripts/babilong_evals/*/qa{1..5}_0k_*.csv``) are exactly
steps 1-2 on the shipped test files (qa1: questions 900..999; qa2-qa5: 899..998). The row counts of
qa6-qa20 come from the dataset's published viewer, not from upstream files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import DiffMambaError
from .babi import babi, normalize_task
from .babilong import Prompt, TEMPLATE, count_tokens

__all__ = ["PAPER_TASKS", "PAPER_PER_TASK", "PAPER_SEED", "UPSTREAM_0K_ROWS", "paper_prompts", "upstream_rows"]

PAPER_TASKS = tuple(f"qa{i}" for i in range(1, 21))
PAPER_PER_TASK = 100
PAPER_SEED = 42
UPSTREAM_0K_ROWS = {f"qa{i}": 1000 if i == 1 or 6 <= i <= 10 else 999 for i in range(1, 21)}
"""Rows per task in RMT-team/babilong-1k-samples, config 0k: the first that many test questions."""


def upstream_rows(task: str | int, per_task: int = PAPER_PER_TASK) -> range:
    """The test-file question indices (0-based) of ``task``'s last ``per_task`` upstream 0k rows."""
    name = normalize_task(task)
    if isinstance(per_task, bool) or not isinstance(per_task, int) or not 1 <= per_task <= UPSTREAM_0K_ROWS[name]:
        raise DiffMambaError(f"per_task must be a whole number from 1 to {UPSTREAM_0K_ROWS[name]} for {name}, "
                             f"got {per_task!r}")
    end = UPSTREAM_0K_ROWS[name]
    return range(end - per_task, end)


def paper_prompts(tasks: Sequence[str | int] = PAPER_TASKS, per_task: int = PAPER_PER_TASK,
                  seed: int = PAPER_SEED, tokenizer: Any = None) -> list[Prompt]:
    """The paper's evaluation prompts, in upstream order (module docstring); defaults = upstream.

    Other ``tasks``/``per_task``/``seed`` apply the same recipe (last ``per_task`` upstream rows of
    each task, in the given task order, permuted with ``numpy.random.default_rng(seed)``).
    ``tokenizer`` only fills ``meta["n_tokens"]`` (project pre-tokenization when ``None``).

    Each `Prompt` has ``task``; its meta has ``story`` (``'qa1:test:181'``, shared by the questions
    of one story), ``story_id``, ``index`` (question number in the test file), ``line`` (its line
    in the file), ``upstream_row`` (row in the upstream task split), ``position`` (place in the
    shuffled set), ``length`` 0 and ``question`` (stripped).
    """
    import numpy as np

    if isinstance(tasks, (str, int)):
        tasks = [tasks]
    names = [normalize_task(t) for t in tasks]
    if not names:
        raise DiffMambaError("paper_prompts needs at least one task")
    if len(set(names)) != len(names):
        raise DiffMambaError(f"a task is given twice in {list(tasks)!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DiffMambaError(f"seed must be a whole number >= 0, got {seed!r}")
    rows = []
    for name in names:
        samples = babi(name, "test", size="1k")
        rows += [(name, i, samples[i]) for i in upstream_rows(name, per_task)]
    order = np.random.default_rng(seed).permutation(len(rows))
    prompts = []
    for position, r in enumerate(order.tolist()):
        name, i, s = rows[r]
        text = TEMPLATE.format(facts=" ".join(s.facts), question=s.raw_question)
        meta = {
            "source": "paper", "split": "test", "story_id": s.story_id, "story": f"{name}:test:{s.story_id}",
            "index": i, "line": s.line, "upstream_row": i, "position": position, "length": 0,
            "n_tokens": count_tokens(text, tokenizer), "question": s.question, "facts": s.facts,
            "supporting": s.supporting, "supporting_facts": tuple(s.facts[k] for k in s.supporting),
        }
        prompts.append(Prompt(prompt=text, answer=s.answer, candidates=s.candidates, task=name, meta=meta))
    return prompts
