"""Data spec strings, as the CLI takes them, and loading them into `Prompt`s.

Grammar::

    babi:TASK[:SPLIT]              BABILong 0k of a bAbI task (SPLIT: test (default) or train)
    babilong:TASK:LENGTHS[:SPLIT]  BABILong with book filler up to each length: one ('0k', '1k',
                                   '4k', '128k', or tokens) or a comma list ('0k,1k,2k,4k')
    paper  (or babilong-paper)     the paper's SNR set: BABILong 0k, qa1-qa20, the last 100 upstream
                                   rows of each, shuffled as upstream (`paper.paper_prompts`)
    jsonl:PATH                     one JSON object a line (UTF-8): "prompt", "answer", optional
                                   "candidates" (list of strings), "task" and "story"; other fields
                                   go to Prompt.meta

TASK is ``qa1``..``qa20`` or a number (shipped: test of all 20, train of qa1-qa5). Lengths above
128k are refused. Every problem raises `DiffMambaError` with a one-line message.

Which examples (`load_data`):

* ``n=None``: all of them, in file order (bAbI question order, jsonl line order); for ``paper``,
  all 2,000 in upstream order.
* ``n`` given (a whole number >= 1, at most the number of examples, else an error naming the spec):
  n examples sampled without replacement with ``seed``: the first n of one seeded shuffle of all
  of them, so for a given seed the order is fixed and ``n=5`` is a prefix of ``n=10``. For
  ``paper`` the order is upstream's seed-42 shuffle and ``n`` takes its head, as upstream's
  ``--num_examples`` does (``seed`` is not used for it).
* Several lengths: the same n questions at each length, all of the first length, then the next
  (``Prompt.meta["length"]`` says which); n counts questions, so ``n * len(lengths)`` prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DiffMambaError
from .babi import SPLITS, babi, normalize_task
from .babilong import Prompt, babilong, check_n, format_length, parse_lengths
from .paper import paper_prompts

__all__ = ["DataSpec", "parse_data_spec", "load_data", "read_jsonl", "sample_indices"]

SCHEMES = ("babi", "babilong", "jsonl", "paper")
PAPER_SPECS = ("paper", "babilong-paper")
_USAGE = "expected babi:TASK[:SPLIT], babilong:TASK:LENGTH[,LENGTH...][:SPLIT], paper or jsonl:PATH"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec. ``length`` is in tokens (0 = no filler): an int, or a tuple of ints for
    several lengths (`lengths` is always a tuple); ``path`` only for jsonl."""

    scheme: str
    task: str | None = None
    split: str = "test"
    length: int | tuple[int, ...] = 0
    path: str | None = None

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.length if isinstance(self.length, tuple) else (self.length,)

    def __str__(self) -> str:
        if self.scheme == "jsonl":
            return f"jsonl:{self.path}"
        if self.scheme == "paper":
            return "paper"
        if self.scheme == "babi":
            return f"babi:{self.task}:{self.split}"
        return f"babilong:{self.task}:{','.join(format_length(t) for t in self.lengths)}:{self.split}"


def _split(value: str, spec: str) -> str:
    if value not in SPLITS:
        raise DiffMambaError(f"unknown split {value!r} in data spec {spec!r}: expected {' or '.join(SPLITS)}")
    return value


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """Parse ``babi:qa1``, ``babi:qa1:train``, ``babilong:qa2:1k``, ``babilong:qa1:0k,1k,2k``,
    ``paper``, ``jsonl:PATH`` (see module doc)."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str):
        raise DiffMambaError(f"data spec must be a string, got {spec!r}")
    text = spec.strip()
    if text in PAPER_SPECS:
        return DataSpec("paper")
    scheme, sep, rest = text.partition(":")
    if scheme in PAPER_SPECS:
        raise DiffMambaError(f"data spec {spec!r}: 'paper' takes no arguments (it is qa1-qa20, 100 each)")
    if not sep or scheme not in SCHEMES:
        raise DiffMambaError(f"unknown data spec {spec!r}: {_USAGE}")
    if scheme == "jsonl":
        if not rest:
            raise DiffMambaError(f"data spec {spec!r} names no file: expected jsonl:PATH")
        return DataSpec("jsonl", path=rest)
    parts = rest.split(":")
    if scheme == "babi":
        if not 1 <= len(parts) <= 2 or not parts[0]:
            raise DiffMambaError(f"bad data spec {spec!r}: expected babi:TASK[:SPLIT], e.g. babi:qa1:train")
        split = _split(parts[1], spec) if len(parts) == 2 else "test"
        return DataSpec("babi", task=normalize_task(parts[0]), split=split)
    if not 2 <= len(parts) <= 3 or not parts[0]:
        raise DiffMambaError(f"bad data spec {spec!r}: expected babilong:TASK:LENGTH[,LENGTH...][:SPLIT], "
                             "e.g. babilong:qa2:1k or babilong:qa1:0k,1k,2k")
    split = _split(parts[2], spec) if len(parts) == 3 else "test"
    try:
        lengths = parse_lengths(parts[1])
    except DiffMambaError as e:
        raise DiffMambaError(f"{e} (data spec {spec!r})") from None
    length = lengths[0] if len(lengths) == 1 else lengths
    return DataSpec("babilong", task=normalize_task(parts[0]), split=split, length=length)


def sample_indices(total: int, n: int | None, seed: int, key: str) -> list[int]:
    """``range(total)`` when ``n`` is None, else the first ``n`` of a shuffle seeded by
    ``(seed, key)`` (``random.Random(f"load_data:{seed}:{key}")``)."""
    order = list(range(total))
    if n is None:
        return order
    random.Random(f"load_data:{seed}:{key}").shuffle(order)
    return order[:n]


def _check_available(n: int | None, total: int, spec: str) -> None:
    if n is not None and n > total:
        raise DiffMambaError(f"n={n} but {spec} has {total} examples")


def _jsonl_prompt(obj: Any, path: Path, lineno: int) -> Prompt:
    where = f"{path} line {lineno}"
    if not isinstance(obj, dict):
        raise DiffMambaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "answer"):
        if key not in obj:
            raise DiffMambaError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise DiffMambaError(f"{where}: field {key!r} must be a string")
    candidates = obj.get("candidates", [])
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
        raise DiffMambaError(f"{where}: field 'candidates' must be a list of strings")
    task = obj.get("task", "jsonl")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "answer", "candidates", "task")}
    return Prompt(prompt=obj["prompt"], answer=obj["answer"], candidates=tuple(candidates),
                  task=str(task), meta={"source": "jsonl", "line": lineno, "story": f"jsonl:{lineno}", **meta})


def read_jsonl(path: str | Path, n: int | None = None) -> list[Prompt]:
    """`Prompt`s from a UTF-8 JSON-lines file (blank lines skipped); the first ``n`` when given.

    Each prompt's meta has ``source``, ``line`` and ``story`` (the row's "story" field, else
    ``'jsonl:LINE'``: every row its own story).
    """
    path = Path(path)
    if not path.is_file():
        raise DiffMambaError(f"data file {str(path)!r} does not exist")
    check_n(n, allow_zero=True)
    prompts: list[Prompt] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if n is not None and len(prompts) >= n:
                break
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DiffMambaError(f"{path} line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                     f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DiffMambaError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            prompts.append(_jsonl_prompt(obj, path, lineno))
    return prompts


def load_data(spec: str | DataSpec, n: int | None = None, seed: int = 0, tokenizer: Any = None,
              filler: str | Path | None = "books") -> list[Prompt]:
    """Load a data spec as `Prompt`s: all (``n=None``) or ``n`` sampled with ``seed`` (module doc).

    ``seed`` also seeds BABILong filler; ``tokenizer`` counts tokens for BABILong lengths;
    ``filler`` is passed to `babilong` (``'books'``, ``'babi'`` or a text file).

    Raises:
        DiffMambaError: a bad spec; ``n`` not a whole number >= 1 (``2.5``, ``True``, ``0``,
        ``-1``); ``n`` above the number of examples (``"n=5000 but babi:qa1:test has 1000
        examples"``); a bad file.
    """
    parsed = parse_data_spec(spec)
    check_n(n)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DiffMambaError(f"seed must be a whole number, got {seed!r}")
    if parsed.scheme == "paper":
        prompts = paper_prompts(tokenizer=tokenizer)
        _check_available(n, len(prompts), str(parsed))
        return prompts if n is None else prompts[:n]
    if parsed.scheme == "jsonl":
        rows = read_jsonl(parsed.path)
        _check_available(n, len(rows), str(parsed))
        return [rows[i] for i in sample_indices(len(rows), n, seed, str(parsed))]
    total = len(babi(parsed.task, parsed.split))
    _check_available(n, total, str(parsed))
    indices = sample_indices(total, n, seed, f"{parsed.task}:{parsed.split}")
    return [p for length in parsed.lengths
            for p in babilong(parsed.task, length, parsed.split, seed=seed, tokenizer=tokenizer,
                              filler=filler, indices=indices)]
