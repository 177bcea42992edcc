"""BABILong-style prompts from bAbI stories, with optional filler up to a token length.

Prompt template (SPEC §4, as in the upstream evaluation script)::

    <context> \\n{facts}\\n</context>\\n\\nQuestion: {question} Answer:

with the facts joined by single spaces; the target is the first token of ``" " + answer``.

Filler. Length ``"0k"`` (or 0) adds none. For a longer length (``"1k"`` = 1024 tokens, or a plain
token count) filler sentences are added until the prompt has at least that many tokens, counted
with ``tokenizer`` when given and otherwise with the project tokenizer's pre-tokenization
(`tokenizer.pretokenize`, identical to `build_babi_tokenizer`'s token count). Each filler sentence
goes into a random gap between facts (before the first, between two, or after the last); facts keep
their order and so do filler sentences. Filler sources:

* default, ``filler=None``: the distinct facts of an unrelated bAbI task (train split, en), which
  cannot change the answer. qa1, qa2, qa3, qa5 (people, places, objects) use qa4 facts such as
  "The kitchen is north of the garden." (no people, no objects, no movement); qa4 (and qa19, which
  also reasons over directions) uses qa1 facts such as "John travelled to the hallway." (no
  direction relations). Any other task uses qa4. Sentences are drawn uniformly with replacement.
  All filler words are in the shipped tokenizer's vocabulary.
* ``filler="path.txt"``: a text file split into sentences (after ``.``, ``!`` or ``?``; whitespace,
  newlines included, collapsed to single spaces); consecutive sentences are taken from a random
  starting sentence, wrapping around, as BABILong does with its background books.

Randomness is seeded per sample from ``(seed, task, split, sample index)``, so ``n=5`` gives the
first five prompts of ``n=10`` and results do not depend on the process.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import DiffMambaError
from .babi import babi, normalize_task
from .tokenizer import pretokenize

__all__ = ["TEMPLATE", "FILLER_TASKS", "Prompt", "format_prompt", "parse_length", "count_tokens",
           "babilong", "training_stream"]

TEMPLATE = "<context> \n{facts}\n</context>\n\nQuestion: {question} Answer:"
DEFAULT_FILLER_TASK = "qa4"
FILLER_TASKS = {"qa4": "qa1", "qa19": "qa1"}  # target task -> filler task; others use qa4
_LENGTH = re.compile(r"(\d+)(k?)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Prompt:
    """One evaluation or training prompt: the text up to ``Answer:`` and the expected answer.

    ``candidates`` are the other plausible answers (for bAbI: same-kind answers in the facts).
    ``meta`` holds where it came from (source, split, story_id, length, n_tokens, fact_positions,
    supporting fact indices...); it takes part in ``==`` but not in ``hash``.
    """

    prompt: str
    answer: str
    candidates: tuple[str, ...] = ()
    task: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def target(self) -> str:
        """The text whose first token is the target: ``" " + answer``."""
        return " " + self.answer


def format_prompt(facts: Sequence[str], question: str) -> str:
    """Fill `TEMPLATE`: facts joined by single spaces."""
    return TEMPLATE.format(facts=" ".join(facts), question=question)


def parse_length(length: str | int) -> int:
    """``'0k'`` -> 0, ``'4k'`` -> 4096, ``'300'`` or 300 -> 300 tokens."""
    m = _LENGTH.fullmatch(str(length).strip())
    if m is None or isinstance(length, bool):
        raise DiffMambaError(f"bad BABILong length {length!r}: expected e.g. '0k', '1k', '4k' or a token count")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Tokens in ``text``: ``tokenizer.encode(text, add_special_tokens=False)`` when given (an HF
    tokenizer or a `tokenizers.Tokenizer`), else the project pre-tokenization's word count."""
    if tokenizer is None:
        return len(pretokenize(text))
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return len(getattr(encoded, "ids", encoded))


@lru_cache(maxsize=8)
def _task_filler(task: str) -> tuple[str, ...]:
    return tuple(sorted({fact for s in babi(task, "train", size="1k") for fact in s.facts}))


@lru_cache(maxsize=8)
def _file_filler(path: str, mtime_ns: int) -> tuple[str, ...]:
    text = " ".join(Path(path).read_text(encoding="utf-8", errors="replace").split())
    return tuple(s for s in _SENTENCE_END.split(text) if s)


def _filler_pool(task: str, filler: str | Path | None) -> tuple[tuple[str, ...], bool, str]:
    """(sentences, sequential?, a name for meta)."""
    if filler is None:
        source = FILLER_TASKS.get(task, DEFAULT_FILLER_TASK)
        return _task_filler(source), False, source
    path = Path(filler)
    if not path.is_file():
        raise DiffMambaError(f"filler file {str(path)!r} does not exist")
    sentences = _file_filler(str(path.resolve()), path.stat().st_mtime_ns)
    if not sentences:
        raise DiffMambaError(f"filler file {str(path)!r} has no sentences")
    return sentences, True, str(path)


def _assemble(facts: Sequence[str], chosen: list[str], gaps: list[int]) -> tuple[list[str], list[int]]:
    """Interleave: ``chosen[j]`` goes before fact ``gaps[j]`` (gaps sorted; len(facts) = at the end)."""
    sentences: list[str] = []
    positions: list[int] = []
    j = 0
    for i, fact in enumerate([*facts, None]):
        while j < len(chosen) and gaps[j] == i:
            sentences.append(chosen[j])
            j += 1
        if fact is not None:
            positions.append(len(sentences))
            sentences.append(fact)
    return sentences, positions


def _fill(facts: Sequence[str], question: str, target: int, pool: tuple[str, ...], sequential: bool,
          rng: random.Random, tokenizer: Any, costs: dict[str, int]) -> tuple[str, list[int], int, int]:
    """(prompt, fact_positions, n_filler, n_tokens) with at least ``target`` tokens when possible.

    ``costs`` caches each filler sentence's token count across the samples of one call.
    """
    prompt = format_prompt(facts, question)
    n_tokens = count_tokens(prompt, tokenizer)
    if n_tokens >= target:
        return prompt, list(range(len(facts))), 0, n_tokens
    start = rng.randrange(len(pool))
    chosen: list[str] = []
    gaps: list[int] = []

    def draw() -> int:
        sentence = pool[(start + len(chosen)) % len(pool)] if sequential else rng.choice(pool)
        chosen.append(sentence)
        gaps.append(rng.randint(0, len(facts)))
        if sentence not in costs:
            costs[sentence] = max(1, count_tokens(" " + sentence, tokenizer))
        return costs[sentence]

    estimate = n_tokens
    while estimate < target:  # additive estimate (exact for the default word count)
        estimate += draw()
    while True:  # verify on the whole text: subword tokenizers need not be additive
        sentences, positions = _assemble(facts, chosen, sorted(gaps))
        prompt = format_prompt(sentences, question)
        n_tokens = count_tokens(prompt, tokenizer)
        if n_tokens >= target:
            return prompt, positions, len(chosen), n_tokens
        draw()


def babilong(task: str | int, length: str | int = "0k", split: str = "test",
             filler: str | Path | None = None, seed: int = 0, tokenizer: Any = None,
             n: int | None = None, size: str | None = None,
             data_dir: str | Path | None = None) -> list[Prompt]:
    """BABILong-style prompts, one per bAbI question (see the module docstring).

    Args:
        task: ``'qa1'``..``'qa20'`` or an int (shipped: qa1-qa5).
        length: ``'0k'`` (no filler), ``'1k'``, ``'2k'``, ``'4k'``..., or a token count.
        split: ``'train'`` or ``'test'``.
        filler: path of a text file for filler; ``None`` uses an unrelated bAbI task's facts.
        seed: seeds filler choice and placement.
        tokenizer: counts tokens for ``length``; ``None`` uses the project pre-tokenization.
        n: keep the first ``n`` questions (all when ``None`` or larger than the task).
        size, data_dir: passed to `babi`.
    """
    target = parse_length(length)
    if n is not None and n < 0:
        raise DiffMambaError(f"n must be >= 0, got {n}")
    name = normalize_task(task, data_dir)
    samples = babi(name, split, size=size, data_dir=data_dir)[:n]
    use_filler = target > 0 or filler is not None  # a bad filler path fails even at 0k
    pool, sequential, filler_name = _filler_pool(name, filler) if use_filler else ((), False, None)
    prompts, costs = [], {}
    for i, s in enumerate(samples):
        if target > 0:
            rng = random.Random(f"babilong:{seed}:{name}:{split}:{i}")
            text, positions, n_filler, n_tokens = _fill(
                s.facts, s.question, target, pool, sequential, rng, tokenizer, costs)
        else:
            text = format_prompt(s.facts, s.question)
            positions, n_filler, n_tokens = list(range(len(s.facts))), 0, count_tokens(text, tokenizer)
        meta = {
            "source": "babilong", "split": split, "story_id": s.story_id, "index": i,
            "length": target, "n_tokens": n_tokens, "n_filler": n_filler, "filler": filler_name,
            "question": s.question, "facts": s.facts, "fact_positions": tuple(positions),
            "supporting": s.supporting, "supporting_facts": tuple(s.facts[k] for k in s.supporting),
        }
        prompts.append(Prompt(prompt=text, answer=s.answer, candidates=s.candidates, task=name, meta=meta))
    return prompts


def training_stream(tasks: Sequence[str | int] = ("qa1", "qa2", "qa3", "qa4", "qa5"), split: str = "train",
                    size: str | None = None, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Yield ``(prompt, answer)`` for every question of ``tasks`` (BABILong 0k template).

    In task order and file order, or, with ``shuffle=True``, in one seeded shuffle of all of them.
    The training target is ``" " + answer`` after the prompt. ``size=None`` reads en-10k train where
    shipped (qa1, qa2, qa4, qa5) and en otherwise (qa3).
    """
    pairs = [(format_prompt(s.facts, s.question), s.answer)
             for task in tasks for s in babi(task, split, size=size)]
    if shuffle:
        random.Random(f"training_stream:{seed}").shuffle(pairs)
    yield from pairs
