"""Data spec strings, as the CLI takes them, and loading them into `Prompt`s.

Grammar::

    babi:TASK[:SPLIT]             BABILong 0k of a bAbI task (SPLIT: test (default) or train)
    babilong:TASK:LENGTH[:SPLIT]  BABILong with filler up to LENGTH ('0k', '1k', '4k', or tokens)
    jsonl:PATH                    one JSON object a line: "prompt", "answer", optional "candidates"
                                  (list of strings) and "task"; other fields go to Prompt.meta

TASK is ``qa1``..``qa20`` or a number (shipped: qa1-qa5). Every problem raises `DiffMambaError`
with a one-line message. ``n`` keeps the first n prompts (file or question order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DiffMambaError
from .babi import SPLITS, normalize_task
from .babilong import Prompt, babilong, parse_length

__all__ = ["DataSpec", "parse_data_spec", "load_data", "read_jsonl"]

SCHEMES = ("babi", "babilong", "jsonl")
_USAGE = "expected babi:TASK[:SPLIT], babilong:TASK:LENGTH[:SPLIT] or jsonl:PATH"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec. ``length`` is in tokens (0 = no filler); ``path`` only for jsonl."""

    scheme: str
    task: str | None = None
    split: str = "test"
    length: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.scheme == "jsonl":
            return f"jsonl:{self.path}"
        if self.scheme == "babi":
            return f"babi:{self.task}:{self.split}"
        return f"babilong:{self.task}:{self.length}:{self.split}"


def _split(value: str, spec: str) -> str:
    if value not in SPLITS:
        raise DiffMambaError(f"unknown split {value!r} in data spec {spec!r}: expected {' or '.join(SPLITS)}")
    return value


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """Parse ``babi:qa1``, ``babi:qa1:train``, ``babilong:qa2:1k``, ``jsonl:PATH`` (see module doc)."""
    if isinstance(spec, DataSpec):
        return spec
    scheme, sep, rest = str(spec).strip().partition(":")
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
        raise DiffMambaError(f"bad data spec {spec!r}: expected babilong:TASK:LENGTH[:SPLIT], e.g. babilong:qa2:1k")
    split = _split(parts[2], spec) if len(parts) == 3 else "test"
    return DataSpec("babilong", task=normalize_task(parts[0]), split=split, length=parse_length(parts[1]))


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
                  task=str(task), meta={"source": "jsonl", "line": lineno, **meta})


def read_jsonl(path: str | Path, n: int | None = None) -> list[Prompt]:
    """`Prompt`s from a JSON-lines file (blank lines skipped); the first ``n`` when given."""
    path = Path(path)
    if not path.is_file():
        raise DiffMambaError(f"data file {str(path)!r} does not exist")
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if n is not None and len(prompts) >= n:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DiffMambaError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            prompts.append(_jsonl_prompt(obj, path, lineno))
    return prompts


def load_data(spec: str | DataSpec, n: int | None = None, seed: int = 0, tokenizer: Any = None) -> list[Prompt]:
    """Load a data spec as `Prompt`s: the first ``n`` (all when ``None``).

    ``seed`` and ``tokenizer`` set BABILong filler choice and token counting (see `babilong`).
    """
    parsed = parse_data_spec(spec)
    if n is not None and n < 0:
        raise DiffMambaError(f"n must be >= 0, got {n}")
    if parsed.scheme == "jsonl":
        return read_jsonl(parsed.path, n)
    return babilong(parsed.task, parsed.length, parsed.split, seed=seed, tokenizer=tokenizer, n=n)
