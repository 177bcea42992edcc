"""Extra qa1 training questions: where is every person the story has moved so far?

bAbI qa1 asks about one person at each question point, and about half the time that person is the
one who moved last, so answering the last-mentioned place scores about 0.56 (measured on the test
split). Small models trained on the file's questions alone often settle on that shortcut. Asking, at
every question point, where each person seen so far is (answer: the place of their latest move)
makes the last-mentioned place the answer of only a minority of the questions, so the shortcut stops
paying. The extra questions come from the training facts alone; the test split is never augmented.

A story gets extra questions only if every fact is a move (``Mary went back to the kitchen.``) and
every question is ``Where is <person>?``: the other tasks, and any unexpected line, are left as the
file has them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from itertools import groupby
from typing import Sequence

from .babi import BabiSample, _candidates

__all__ = ["ask_every_person"]

_MOVE = re.compile(r"([A-Z][a-z]+) (?:[a-z]+ )+to the ([a-z]+)\.")
_WHERE = re.compile(r"Where is ([A-Z][a-z]+)\?")


def _extra_questions(story: list[BabiSample], vocabulary: frozenset[str]) -> list[BabiSample] | None:
    """The story's questions with, after each, one per other person moved so far (first mention order;
    candidates by bAbI's rule over the file's answer `vocabulary`); None when the story is not a
    qa1-style move story."""
    facts = story[-1].facts
    moves = [_MOVE.fullmatch(f) for f in facts]
    if not all(moves) or not all(_WHERE.fullmatch(s.question) for s in story):
        return None
    out: list[BabiSample] = []
    for sample in story:
        n = len(sample.facts)
        if sample.facts != facts[:n]:
            return None
        last: dict[str, int] = {}  # person -> index of their latest move (insertion order: first mention)
        for i, m in enumerate(moves[:n]):
            last[m.group(1)] = i
        out.append(sample)
        asked = _WHERE.fullmatch(sample.question).group(1)
        for person, i in last.items():
            if person == asked:
                continue
            answer = moves[i].group(2)
            out.append(replace(sample, question=f"Where is {person}?", raw_question=f"Where is {person}? ",
                               answer=answer, supporting=(i,), candidates=_candidates(answer, sample.facts, vocabulary)))
    return out


def ask_every_person(samples: Sequence[BabiSample]) -> tuple[BabiSample, ...]:
    """`samples` (one task's file, in file order) with the extra questions after each question of every
    move story (see the module docstring); stories stay in order and keep their ``story_id``."""
    vocabulary = frozenset(s.answer for s in samples)  # as `babi`: every answer of the file
    out: list[BabiSample] = []
    for _, group in groupby(samples, key=lambda s: s.story_id):
        story = list(group)
        out += _extra_questions(story, vocabulary) or story
    return tuple(out)
