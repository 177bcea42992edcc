"""BABILong prompts from bAbI stories, with filler up to a token length, as the benchmark builds them.

Prompt template (SPEC §4, as in the upstream evaluation script)::

    <context> \\n{facts}\\n</context>\\n\\nQuestion: {question} Answer:

with the context sentences joined by single spaces; the target is the first token of ``" " + answer``.
One prompt per bAbI question: the facts of its story before it (earlier questions dropped).

Lengths. ``"0k"`` (or 0) adds no filler. ``"Nk"`` is N * 1024 tokens, a plain number is tokens; at
most ``128k`` (`MAX_LENGTH` = 131072 tokens): a larger or malformed length raises `DiffMambaError`
before anything is built. (BABILong's own names mean N * 1000 tokens: its ``1k`` is 1000.)

Budget (BABILong ``create_tasks.py``): `RESERVED_TOKENS` (300) of ``length`` are left for the
template and the question, so facts plus filler get ``length - 300`` tokens. Filler sentences are
added, whole, until the facts plus the filler reach that budget (the last sentence crosses it;
BABILong cuts the last sentence at the exact token, this module keeps it whole). When the facts
alone fill the budget no filler is added (BABILong instead drops such samples; here every question
is kept, so the same questions appear at every length). Tokens are counted once per distinct
sentence, as ``" " + sentence``, with ``tokenizer`` when given and otherwise with the project's
pre-tokenization (`tokenizer.pretokenize`, where the sum is exact; for a subword tokenizer it can
differ from the whole text's count by a few tokens); the whole prompt is counted once at the end
for ``meta["n_tokens"]``. No sentence is counted twice and the book is never tokenized whole, so a
128k prompt takes seconds (about 0.5 s with the default count) and little memory.

Placement (BABILong ``NoiseInjectionDataset``): with k filler sentences, each fact independently gets
a uniform random slot 0..k; the slots are sorted, so facts keep their order; facts in slot i come
right before filler sentence i.

Filler sources (``filler=``):

* ``"books"`` (default): sentences of the three shipped public-domain books (`books.BOOKS`; the
  benchmark uses PG-19 books), consecutive from a random starting sentence, wrapping around; as
  BABILong's ``SentenceSampler``, sentences under `MIN_BOOK_SENTENCE_TOKENS` (10) tokens are
  skipped. Prose unrelated to the stories, as PG-19 is in BABILong (words such as "Mary" or
  "garden" do occur in it, as in any book).
* ``"babi"``: the distinct facts of an unrelated bAbI task (train split, en), drawn uniformly with
  replacement: qa1, qa2, qa3, qa5 and the others use qa4 facts such as "The kitchen is north of the
  garden." (no people, no objects, no movement); qa4 and qa19 (directions) use qa1 facts such as
  "John travelled to the hallway.". They are distractors (they name candidate locations), not noise;
  all their words are in the bAbI tokenizer's vocabulary.
* a path to a UTF-8 text file: split with `books.split_sentences`, consecutive from a random start,
  wrapping around, no minimum length. A `Path` is always a file; a str is a file unless it is
  ``"books"`` or ``"babi"``.

Randomness is seeded per question from ``(seed, task, split, question index, length)``: the same
question gets the same prompt whichever other questions are built, and results do not depend on
the process.
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
from .books import _book_sentences, _file_sentences
from .tokenizer import pretokenize

__all__ = ["TEMPLATE", "FILLER_TASKS", "MAX_LENGTH", "RESERVED_TOKENS", "MIN_BOOK_SENTENCE_TOKENS", "Prompt",
           "format_prompt", "parse_length", "parse_lengths", "format_length", "count_tokens",
           "babi_filler_task", "babilong", "filler_sentences", "training_stream"]

TEMPLATE = "<context> \n{facts}\n</context>\n\nQuestion: {question} Answer:"
MAX_LENGTH = 128 * 1024
RESERVED_TOKENS = 300
MIN_BOOK_SENTENCE_TOKENS = 10
DEFAULT_FILLER_TASK = "qa4"
FILLER_TASKS = {"qa4": "qa1", "qa19": "qa1"}  # target task -> bAbI filler task; others use qa4
_LENGTH = re.compile(r"(\d+)(k?)", re.IGNORECASE)


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
    """``'0k'`` -> 0, ``'4k'`` -> 4096, ``'300'`` or 300 -> 300 tokens; at most `MAX_LENGTH` (128k)."""
    if isinstance(length, bool) or not isinstance(length, (str, int)):
        raise DiffMambaError(f"bad BABILong length {length!r}: expected e.g. '0k', '1k', '4k' or a token count")
    m = _LENGTH.fullmatch(str(length).strip())
    if m is None:
        hint = "; give one length here (load_data takes a comma list)" if "," in str(length) else ""
        raise DiffMambaError(f"bad BABILong length {length!r}: expected e.g. '0k', '1k', '4k' or a token count{hint}")
    tokens = int(m.group(1)) * (1024 if m.group(2) else 1)
    if tokens > MAX_LENGTH:
        raise DiffMambaError(f"BABILong length {length!r} is {tokens:,} tokens, above the maximum 128k "
                             f"({MAX_LENGTH:,} tokens)")
    return tokens


def parse_lengths(lengths: str | int | Sequence[str | int]) -> tuple[int, ...]:
    """``'0k,1k,2k'`` or ``['0k', 1024]`` -> ``(0, 1024, 2048)``: each checked by `parse_length`,
    in the given order, no repeats."""
    items = lengths.split(",") if isinstance(lengths, str) else [lengths] if isinstance(lengths, int) else list(lengths)
    if not items:
        raise DiffMambaError("no BABILong length given: expected e.g. '0k' or '0k,1k,2k'")
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise DiffMambaError(f"bad BABILong lengths {lengths!r}: an empty entry (expected e.g. '0k,1k,2k')")
        tokens = parse_length(item)
        if tokens in out:
            raise DiffMambaError(f"BABILong length {format_length(tokens)} is given twice in {lengths!r}")
        out.append(tokens)
    return tuple(out)


def format_length(tokens: int) -> str:
    """4096 -> ``'4k'``, 0 -> ``'0k'``, 300 -> ``'300'`` (inverse of `parse_length`)."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Tokens in ``text``: ``tokenizer.encode(text, add_special_tokens=False)`` when given (an HF
    tokenizer or a `tokenizers.Tokenizer`), else the project pre-tokenization's word count."""
    if tokenizer is None:
        return len(pretokenize(text))
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return len(getattr(encoded, "ids", encoded))


def babi_filler_task(task: str | int | None) -> str:
    """The bAbI task whose facts are ``filler="babi"`` for ``task`` (qa4 unless `FILLER_TASKS` says)."""
    if task is None:
        return DEFAULT_FILLER_TASK
    return FILLER_TASKS.get(normalize_task(task), DEFAULT_FILLER_TASK)


@lru_cache(maxsize=8)
def _task_filler(task: str) -> tuple[str, ...]:
    return tuple(sorted({fact for s in babi(task, "train", size="1k") for fact in s.facts}))


def filler_sentences(source: str | Path = "books", task: str | int | None = None) -> tuple[str, ...]:
    """Filler sentences in a fixed order.

    Args:
        source: ``"books"`` (the shipped books, `BOOKS` order, each in reading order), ``"babi"``
            (the distinct facts of a bAbI task unrelated to ``task``, sorted: see
            `babilong.FILLER_TASKS`), or the path of a UTF-8 text file (split with
            `split_sentences`). A `Path` is always a file, even one named ``books``.
        task: for ``"babi"``: the task the filler is for (``None``: qa4 facts, as for qa1).
    """
    if isinstance(source, str) and source == "books":
        return _book_sentences()
    if isinstance(source, str) and source == "babi":
        return _task_filler(babi_filler_task(task))
    path = Path(source)
    if not path.is_file():
        raise DiffMambaError(f"filler file {str(path)!r} does not exist (filler is 'books', 'babi' or a text file)")
    sentences = _file_sentences(str(path.resolve()), path.stat().st_mtime_ns)
    if not sentences:
        raise DiffMambaError(f"filler file {str(path)!r} has no sentences")
    return sentences



@dataclass(frozen=True)
class _Pool:
    sentences: tuple[str, ...]
    sequential: bool  # consecutive from a random start (books, files) or drawn with replacement (babi)
    min_tokens: int
    name: str


def _filler_pool(task: str, filler: str | Path | None) -> _Pool:
    if filler is None or (isinstance(filler, str) and filler == "books"):
        return _Pool(filler_sentences("books"), True, MIN_BOOK_SENTENCE_TOKENS, "books")
    if isinstance(filler, str) and filler == "babi":
        source = babi_filler_task(task)
        return _Pool(filler_sentences("babi", task), False, 0, f"babi:{source}")
    if not isinstance(filler, (str, Path)):
        raise DiffMambaError(f"bad filler {filler!r}: expected 'books', 'babi' or the path of a text file")
    return _Pool(filler_sentences(Path(filler)), True, 0, str(filler))


def _check_filler(filler: str | Path | None) -> None:
    """Fail early on a filler that cannot work, even where no filler is needed (length 0)."""
    if filler is None or (isinstance(filler, str) and filler in ("books", "babi")):
        return
    if not isinstance(filler, (str, Path)):
        raise DiffMambaError(f"bad filler {filler!r}: expected 'books', 'babi' or the path of a text file")
    filler_sentences(Path(filler))


class _Builder:
    """Builds the prompts of one `babilong` call; caches each sentence's token count."""

    def __init__(self, task: str, split: str, seed: int, tokenizer: Any, pool: _Pool | None,
                 costs: dict[str, int] | None = None):
        self.task, self.split, self.seed, self.tokenizer, self.pool = task, split, seed, tokenizer, pool
        self.costs: dict[str, int] = {} if costs is None else costs

    def cost(self, sentence: str) -> int:
        c = self.costs.get(sentence)
        if c is None:
            c = self.costs[sentence] = max(1, count_tokens(" " + sentence, self.tokenizer))
        return c

    def draw(self, budget: int, rng: random.Random) -> list[str]:
        """Filler sentences whose token counts first reach ``budget``."""
        pool = self.pool
        chosen: list[str] = []
        total = 0
        if pool.sequential:
            i = rng.randrange(len(pool.sentences))
            skipped = 0
            while total < budget:
                sentence = pool.sentences[i % len(pool.sentences)]
                i += 1
                c = self.cost(sentence)
                if c < pool.min_tokens:
                    skipped += 1
                    if skipped >= len(pool.sentences):
                        raise DiffMambaError(f"filler {pool.name!r} has no sentence of {pool.min_tokens} or more tokens")
                    continue
                skipped = 0
                chosen.append(sentence)
                total += c
        else:
            while total < budget:
                sentence = rng.choice(pool.sentences)
                chosen.append(sentence)
                total += self.cost(sentence)
        return chosen

    def build(self, sample: Any, index: int, length: int) -> Prompt:
        facts = sample.facts
        chosen: list[str] = []
        if length > 0:
            rng = random.Random(f"babilong:{self.seed}:{self.task}:{self.split}:{index}:{length}")
            budget = length - RESERVED_TOKENS - sum(self.cost(f) for f in facts)
            if budget > 0:
                chosen = self.draw(budget, rng)
            slots = sorted(rng.randrange(len(chosen) + 1) for _ in facts)
        else:
            slots = [0] * len(facts)
        sentences: list[str] = []
        positions: list[int] = []
        j = 0
        for slot in range(len(chosen) + 1):
            while j < len(facts) and slots[j] == slot:
                positions.append(len(sentences))
                sentences.append(facts[j])
                j += 1
            if slot < len(chosen):
                sentences.append(chosen[slot])
        text = format_prompt(sentences, sample.question)
        meta = {
            "source": "babilong", "split": self.split, "story_id": sample.story_id,
            "story": f"{self.task}:{self.split}:{sample.story_id}", "index": index, "line": sample.line,
            "length": length, "n_tokens": count_tokens(text, self.tokenizer), "n_filler": len(chosen),
            "filler": self.pool.name if self.pool is not None and length > 0 else None,
            "question": sample.question, "facts": facts, "fact_positions": tuple(positions),
            "supporting": sample.supporting, "supporting_facts": tuple(facts[k] for k in sample.supporting),
        }
        return Prompt(prompt=text, answer=sample.answer, candidates=sample.candidates, task=self.task, meta=meta)


def check_n(n: Any, what: str = "n", allow_zero: bool = False) -> None:
    """``n`` must be a whole number (not a bool) >= 1 (>= 0 with ``allow_zero``), or ``None``."""
    if n is None:
        return
    low = 0 if allow_zero else 1
    if isinstance(n, bool) or not isinstance(n, int) or n < low:
        kind = "a whole number >= 0" if allow_zero else "a positive whole number"
        raise DiffMambaError(f"{what} must be {kind} of examples, got {n!r}")


def babilong(task: str | int, length: str | int = "0k", split: str = "test", seed: int = 0,
             tokenizer: Any = None, n: int | None = None, filler: str | Path | None = "books", *,
             indices: Sequence[int] | None = None, size: str | None = None,
             data_dir: str | Path | None = None, token_counts: dict[str, int] | None = None,
             samples: Sequence[Any] | None = None) -> list[Prompt]:
    """BABILong prompts, one per bAbI question (see the module docstring).

    Args:
        task: ``'qa1'``..``'qa20'`` or an int.
        length: ``'0k'`` (no filler), ``'1k'``, ``'2k'``, ..., ``'128k'``, or a token count.
        split: ``'train'`` or ``'test'``.
        seed: seeds filler choice and placement (per question).
        tokenizer: counts tokens for ``length``; ``None`` uses the project pre-tokenization.
        n: the first ``n`` questions in file order (all when ``None``; fewer if the task has fewer).
        filler: ``'books'`` (default; ``None`` means the same), ``'babi'`` or a text file's path.
        indices: instead of ``n``, these questions (0-based, file order), in this order.
        size, data_dir: passed to `babi`.
        token_counts: a dict kept by the caller across calls with the same ``tokenizer``: each
            sentence's token count is stored in it and never counted again (a training stream
            builds thousands of prompts from the same book sentences).
        samples: these `BabiSample`s instead of the task file's (``indices`` and ``n`` index them), e.g.
            a training set with extra questions (`every_person.ask_every_person`).

    Every meta has ``story_id`` (int, per file) and ``story`` (``'qa1:test:12'``: questions of one
    story share it), ``index`` (question number in the file), ``length`` (tokens asked for) and
    ``n_tokens`` (tokens in the prompt).
    """
    target = parse_length(length)
    check_n(n, allow_zero=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DiffMambaError(f"seed must be a whole number, got {seed!r}")
    if n is not None and indices is not None:
        raise DiffMambaError("give n or indices, not both")
    _check_filler(filler)
    name = normalize_task(task, data_dir)
    if samples is None:
        samples = babi(name, split, size=size, data_dir=data_dir)
    if indices is None:
        chosen = range(len(samples) if n is None else min(n, len(samples)))
    else:
        chosen = list(indices)
        bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(samples)]
        if bad:
            raise DiffMambaError(f"question index {bad[0]!r} out of range for bAbI {name} {split} "
                                 f"({len(samples)} questions)")
    pool = _filler_pool(name, filler) if target > 0 else None
    builder = _Builder(name, split, seed, tokenizer, pool, token_counts)
    return [builder.build(samples[i], i, target) for i in chosen]


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
