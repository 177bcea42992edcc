"""Public-domain books as BABILong filler: the shipped text, its preparation, and a sentence splitter.

BABILong hides the facts of a bAbI story among sentences of PG-19 books: natural prose that has
nothing to do with the question. The package ships three Project Gutenberg books in `FILLER_DIR`
(``filler/``, see its README.txt and LICENSE.txt), prepared once from the project's copies by
`prepare_book` (run ``python -m diffmamba_interp.data.books SRC_DIR`` to redo it):

1. the Project Gutenberg header and footer go (everything up to the ``*** START OF`` line and
   from the ``*** END OF`` line, when present);
2. the front matter goes: everything before the book's first line of text (`BOOKS` names, per
   book, a pattern for it: the title page, publisher, preface, dedication, contents and list of
   illustrations of the 1894 Pride and Prejudice; the title and contents of the other two), and
   the back matter after `Book.end` (the printer's imprint);
3. every ``[Illustration ...]`` block goes, nested brackets and multi-line captions included;
4. italics underscores (``_word_``) are dropped;
5. headings go: a paragraph without a lowercase letter (``CHAPTER II.``, ``I.``,
   ``II. THE RED-HEADED LEAGUE``) or of the form ``Chapter 5`` / ``Letter 1``;
6. a paragraph that starts with a lowercase letter is joined to the one before (an illustration had
   split it);
7. each paragraph is written on one line, whitespace collapsed, paragraphs separated by a blank line.

`split_sentences` splits prose: a sentence ends at ``.``, ``!``, ``?`` (or ``…``), with any closing
quotes or brackets that follow, when the next word starts with a capital letter or an opening quote;
not after a title or other common abbreviation (``Mr.``, ``Mrs.``, ``Dr.``, ``St.``, ``Dec.`` ...) or
a single-letter initial (``J. Watson``; ``I`` is not an initial). A paragraph break always ends a
sentence. Whitespace inside a sentence is collapsed to single spaces.

`babilong.filler_sentences` gives the sentences of a filler source (these books among them) in a fixed order.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import DiffMambaError

__all__ = ["FILLER_DIR", "BOOKS", "Book", "split_sentences", "prepare_book", "book_paragraphs",
           "read_text_file"]

FILLER_DIR: Path = Path(__file__).resolve().parent / "filler"
"""The shipped, prepared books (plus README.txt and LICENSE.txt)."""


@dataclass(frozen=True)
class Book:
    """A shipped book: file name, bibliographic line, and the preparation markers."""

    file: str
    title: str
    author: str
    ebook: int
    start: str  # regex (multiline) of the first line of the text proper; everything before it goes
    end: str | None = None  # regex (multiline) of the first line of the back matter, if any


BOOKS: tuple[Book, ...] = (
    Book("pg1342.txt", "Pride and Prejudice", "Jane Austen", 1342,
         start=r"^\[Illustration: ·PRIDE AND PREJUDICE·", end=r"^\s*CHISWICK PRESS"),
    Book("pg84.txt", "Frankenstein; or, the Modern Prometheus", "Mary Wollstonecraft Shelley", 84,
         start=r"^Letter 1\s*$"),
    Book("pg1661.txt", "The Adventures of Sherlock Holmes", "Arthur Conan Doyle", 1661,
         start=r"^I\. A SCANDAL IN BOHEMIA\s*$"),
)
"""The shipped books, in the order `filler_sentences('books')` reads them."""

_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.M | re.I)
_HEADING = re.compile(r"(chapter|letter)\s+([0-9]+|[ivxlc]+)\.?", re.I)

_ABBREVIATIONS = frozenset("""
    Mr Mrs Ms Messrs Mme Mlle Dr St Jr Sr Prof Capt Col Gen Lt Sgt Rev Hon Esq Gov Sen Rep Bros Co
    Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Vol vol viz cf pp ch Ch Fig fig
""".split())
_BOUNDARY = re.compile(r"(?:[.!?]+|…)[\"'”’)\]]*(?=\s+[\"'“‘(\[]*[A-Z])")
_LAST_WORD = re.compile(r"(\S+)\Z")


def _drop_bracketed(text: str, opener: str = "[Illustration") -> str:
    """Remove every ``[Illustration ...]`` block, counting nested brackets."""
    out: list[str] = []
    pos = 0
    while (start := text.find(opener, pos)) >= 0:
        out.append(text[pos:start])
        depth, i = 0, start
        while i < len(text):
            if text[i] == "[":
                depth += 1
            elif text[i] == "]":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        pos = i + 1  # an unclosed block runs to the end
    out.append(text[pos:])
    return "".join(out)


def prepare_book(text: str, book: Book) -> str:
    """The preparation rules of the module docstring, applied to one book's raw text."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    if m := _PG_START.search(text):
        text = text[m.end():]
    if m := _PG_END.search(text):
        text = text[:m.start()]
    m = re.search(book.start, text, re.M)
    if m is None:
        raise DiffMambaError(f"book {book.file}: start marker {book.start!r} not found")
    text = text[m.start():]
    if book.end and (m := re.search(book.end, text, re.M)):
        text = text[:m.start()]
    text = _drop_bracketed(text).replace("_", "")
    paragraphs = []
    for block in re.split(r"\n[^\S\n]*\n", text):
        para = " ".join(block.split())
        if not para or not re.search(r"[a-z]", para) or _HEADING.fullmatch(para):
            continue
        if paragraphs and para[0].islower():  # an illustration had split this paragraph
            paragraphs[-1] += " " + para
        else:
            paragraphs.append(para)
    return "\n\n".join(paragraphs) + "\n"


def _paragraph_sentences(paragraph: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(paragraph):
        if m.group()[0] == "." and not m.group().startswith(".."):
            word = _LAST_WORD.search(paragraph, start, m.start())
            w = word.group(1).lstrip("\"'“‘([") if word else ""
            if w in _ABBREVIATIONS or (len(w) == 1 and w.isupper() and w != "I"):
                continue
        sentence = paragraph[start:m.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_sentences(text: str) -> list[str]:
    """Sentences of prose (rules in the module docstring); blank lines end paragraphs."""
    out: list[str] = []
    for block in re.split(r"\n[^\S\n]*\n", text):
        paragraph = " ".join(block.split())
        if paragraph:
            out.extend(_paragraph_sentences(paragraph))
    return out


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file; a missing file or a line that is not UTF-8 raises a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DiffMambaError(f"{what} {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DiffMambaError(f"{what} {path} line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); "
                             "save it as UTF-8") from None


def book_paragraphs() -> list[str]:
    """Paragraphs of the shipped books, in `BOOKS` order."""
    return [p for b in BOOKS for p in read_text_file(FILLER_DIR / b.file, "filler book").split("\n\n") if p.strip()]


@lru_cache(maxsize=1)
def _book_sentences() -> tuple[str, ...]:
    return tuple(s for b in BOOKS for s in split_sentences(read_text_file(FILLER_DIR / b.file, "filler book")))


@lru_cache(maxsize=8)
def _file_sentences(path: str, mtime_ns: int) -> tuple[str, ...]:
    return tuple(split_sentences(read_text_file(path, "filler file")))


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - maintenance script
    """Prepare the books from SRC_DIR (raw Gutenberg files named as in `BOOKS`) into `FILLER_DIR`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m diffmamba_interp.data.books SRC_DIR")
    src = Path(args[0])
    for book in BOOKS:
        out = prepare_book((src / book.file).read_text(encoding="utf-8"), book)
        (FILLER_DIR / book.file).write_text(out, encoding="utf-8")
        print(f"{book.file}: {len(out):,} characters, {len(split_sentences(out)):,} sentences")


if __name__ == "__main__":  # pragma: no cover
    main()
