"""bAbI task files: locating them, parsing them, one `BabiSample` per question.

File format (Weston et al. 2015, https://research.facebook.com/downloads/babi/)::

    ID fact
    ID question<TAB>answer<TAB>supporting fact IDs

IDs restart at 1 at each new story; supporting IDs refer to lines of the same story. The copy of
en/qa1 shipped here (taken verbatim from the project's data folder) separates the question fields
with ``|`` instead of tabs, so the parser accepts either separator.

Shipped data (``DATA_DIR``, CC BY 3.0, see ``babi/LICENSE.txt`` and ``babi/NOTICE.txt``): ``en/``
test files of all 20 tasks and train files of qa1-qa5, ``en-10k/`` train for qa1, qa2, qa4, qa5 (the
10k release has no qa3 here). Other train files can be read from a full bAbI release with
``data_dir=`` (the folder that holds ``en/`` and ``en-10k/``).

Stories: ``story_id`` numbers the stories of one file from 0; all questions of a story share it.
``raw_question`` keeps the question exactly as the file has it before the separator (several tasks
end it with a space: ``"Where is John? "``); BABILong's datasets keep that text, and the paper preset
(`paper.paper_prompts`) reproduces it. ``question`` is stripped.

Candidates: the candidate vocabulary of a task is the set of all answers in the same file. For one
question the candidates are the vocabulary entries that (a) are of the same kind as the answer,
where kind = capitalised or not (people are capitalised, places and objects are not: this separates
people from objects in qa5 and changes nothing in qa1-qa4, whose answers are all places),
(b) occur in the sample's facts (every comma-separated part, for list answers such as qa8's), and
(c) differ from the answer. They are sorted. Tasks whose answers never occur in the story (yes/no,
counts, directions) get no candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import DiffMambaError

__all__ = ["DATA_DIR", "BabiSample", "babi", "normalize_task", "available_tasks", "babi_path"]

DATA_DIR: Path = Path(__file__).resolve().parent / "babi"
"""The shipped bAbI files (``en/``, ``en-10k/``, LICENSE.txt, README.txt)."""

SPLITS = ("train", "test")
SIZES = {"1k": "en", "10k": "en-10k"}  # size name -> folder in a bAbI release

_LINE = re.compile(r"(\d+) (.*)")
_QUESTION_SEP = re.compile(r"\t|\|")
_WORD = re.compile(r"[A-Za-z]+")
_TASK = re.compile(r"(?:qa)?(\d+)", re.IGNORECASE)
_FILE = re.compile(r"qa(\d+)_[^/]*_(train|test)\.txt")


@dataclass(frozen=True)
class BabiSample:
    """One bAbI question with the story facts that precede it.

    ``supporting`` holds indices into ``facts`` (not the file's line IDs); ``candidates`` are the
    other answers of the same kind present in the facts (see the module docstring). ``raw_question``
    (the unstripped question text) and ``line`` (1-based line of the question in its file) take no
    part in ``==``.
    """

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]
    candidates: tuple[str, ...]
    story_id: int
    raw_question: str = field(default="", compare=False, repr=False)
    line: int = field(default=0, compare=False, repr=False)


def _root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        return DATA_DIR
    root = Path(data_dir)
    if not root.is_dir():
        raise DiffMambaError(f"bAbI data_dir {str(root)!r} is not a directory")
    return root.resolve()


@lru_cache(maxsize=8)
def _index(root: Path) -> dict[tuple[str, str, str], Path]:
    """(folder, task, split) -> file, for every qa*_{train,test}.txt under en/ and en-10k/."""
    found: dict[tuple[str, str, str], Path] = {}
    for folder in SIZES.values():
        sub = root / folder
        if not sub.is_dir():
            continue
        for path in sorted(sub.iterdir()):
            m = _FILE.fullmatch(path.name)
            if m:
                found[(folder, f"qa{int(m.group(1))}", m.group(2))] = path
    return found


def available_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Tasks with at least one file, in numeric order (``['qa1', ..., 'qa20']`` when shipped)."""
    tasks = {task for _, task, _ in _index(_root(data_dir))}
    return sorted(tasks, key=lambda t: int(t[2:]))


def normalize_task(task: str | int, data_dir: str | Path | None = None) -> str:
    """``'qa1'``, ``'QA1'``, ``'1'`` or ``1`` -> ``'qa1'``; a task without files raises."""
    available = available_tasks(data_dir)
    m = _TASK.fullmatch(str(task).strip())
    if m is None or not 1 <= int(m.group(1)) <= 20:
        raise DiffMambaError(f"unknown bAbI task {task!r}: expected qa1..qa20; available here: {', '.join(available)}")
    name = f"qa{int(m.group(1))}"
    if name not in available:
        where = "shipped" if data_dir is None else f"found in {str(data_dir)!r}"
        raise DiffMambaError(f"bAbI task {name!r} is not {where}; available: {', '.join(available)}")
    return name


def babi_path(task: str | int, split: str = "test", size: str | None = None,
              data_dir: str | Path | None = None) -> Path:
    """The file that `babi` reads for (task, split, size).

    ``size=None`` prefers en-10k for train when that file exists and en otherwise; ``'10k'``
    insists on en-10k for train; ``'1k'`` always uses en. Test sets are read from en (the 10k release
    has the same 1,000 test questions).
    """
    root = _root(data_dir)
    name = normalize_task(task, data_dir)
    if split not in SPLITS:
        raise DiffMambaError(f"unknown bAbI split {split!r} for {name}: expected one of {', '.join(SPLITS)}")
    if size is not None and size not in SIZES:
        raise DiffMambaError(f"unknown bAbI size {size!r}: expected None, '1k' or '10k'")
    index = _index(root)
    if split == "train" and size in (None, "10k") and ("en-10k", name, split) in index:
        return index[("en-10k", name, split)]
    if split == "train" and size == "10k":
        have = sorted({t for f, t, s in index if f == "en-10k" and s == "train"}, key=lambda t: int(t[2:]))
        raise DiffMambaError(f"no en-10k train file for {name}; en-10k has: {', '.join(have) or 'none'}")
    if ("en", name, split) not in index:
        have = [s for s in SPLITS if ("en", name, s) in index]
        where = "shipped" if data_dir is None else f"in {str(data_dir)!r}"
        hint = "; pass data_dir= a full bAbI release for it" if data_dir is None else ""
        raise DiffMambaError(f"no {split} file for bAbI {name} {where} (available splits: {', '.join(have) or 'none'}){hint}")
    return index[("en", name, split)]


def _answer_words(answer: str) -> list[str]:
    return [part.strip() for part in answer.split(",") if part.strip()]


def _candidates(answer: str, facts: tuple[str, ...], vocabulary: frozenset[str]) -> tuple[str, ...]:
    words = set(_WORD.findall(" ".join(facts)))
    kind = answer[:1].isupper()
    return tuple(sorted(
        c for c in vocabulary
        if c != answer and c[:1].isupper() == kind and all(w in words for w in _answer_words(c))
    ))


@lru_cache(maxsize=64)
def _parse_file(path: Path, task: str) -> tuple[BabiSample, ...]:
    """Parse one bAbI file (cached: each file is read once per process)."""
    raw: list[tuple[str, tuple[str, ...], str, str, tuple[int, ...], int, str, int]] = []
    story_id = -1
    facts: list[str] = []
    index_of: dict[int, int] = {}  # line ID -> index into facts
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        data = path.read_bytes()
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DiffMambaError(f"{path}:{lineno}: not UTF-8 (byte 0x{data[e.start]:02x})") from None
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line.strip())
        if m is None:
            raise DiffMambaError(f"{path}:{lineno}: not a bAbI line (expected 'ID text')")
        line_id, text = int(m.group(1)), m.group(2)
        if line_id == 1:
            story_id, facts, index_of = story_id + 1, [], {}
        parts = _QUESTION_SEP.split(text)
        if len(parts) == 1:
            index_of[line_id] = len(facts)
            facts.append(text.strip())
            continue
        if len(parts) != 3:
            raise DiffMambaError(f"{path}:{lineno}: a question line needs question, answer and supporting IDs")
        raw_question = parts[0]
        question, answer, support = (p.strip() for p in parts)
        try:
            supporting = tuple(index_of[int(i)] for i in support.split())
        except (KeyError, ValueError):
            msg = f"{path}:{lineno}: supporting IDs {support!r} do not name facts of this story"
            raise DiffMambaError(msg) from None
        raw.append((task, tuple(facts), question, answer, supporting, story_id, raw_question, lineno))
    vocabulary = frozenset(r[3] for r in raw)
    return tuple(
        BabiSample(task=t, facts=f, question=q, answer=a, supporting=s,
                   candidates=_candidates(a, f, vocabulary), story_id=sid, raw_question=rq, line=ln)
        for t, f, q, a, s, sid, rq, ln in raw
    )


def babi(task: str | int, split: str = "test", size: str | None = None,
         data_dir: str | Path | None = None) -> list[BabiSample]:
    """All questions of a bAbI task as `BabiSample`s, in file order.

    Args:
        task: ``'qa1'``..``'qa20'`` or 1..20 (shipped: test of all 20, train of qa1-qa5).
        split: ``'train'`` or ``'test'``.
        size: ``None`` (train: en-10k where shipped, else en), ``'1k'`` (en) or ``'10k'`` (en-10k).
        data_dir: a full bAbI release to read instead of the shipped files.

    Raises:
        DiffMambaError: unknown or unavailable task, split or size.
    """
    path = babi_path(task, split, size, data_dir)
    return list(_parse_file(path, normalize_task(task, data_dir)))
