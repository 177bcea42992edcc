"""The extra qa1 training questions (`data.every_person`) and the training stream that reads them."""

import re

import pytest

from diffmamba_interp.data import babi, babilong
from diffmamba_interp.data.every_person import ask_every_person
from diffmamba_interp.data.subword import build_subword_tokenizer
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.train import PromptStream, TrainConfig

MOVE = re.compile(r"([A-Z][a-z]+) .* to the ([a-z]+)\.")


def last_place(facts, person):
    """The answer by reading the facts backwards: the place of the person's latest move."""
    for fact in reversed(facts):
        who, where = MOVE.fullmatch(fact).groups()
        if who == person:
            return where
    raise AssertionError(f"{person} never moved")


def test_every_person_seen_is_asked_with_the_place_of_their_latest_move():
    samples = babi("qa1", "train")[:500]
    extra = ask_every_person(samples)
    assert extra[0] == samples[0] and set(samples) <= set(extra)  # the file's questions all stay, first at each point
    assert len(extra) > 2 * len(samples)
    by_point: dict = {}
    for s in extra:
        person = re.fullmatch(r"Where is ([A-Z][a-z]+)\?", s.question).group(1)
        assert s.answer == last_place(s.facts, person)
        assert MOVE.fullmatch(s.facts[s.supporting[0]]).groups() == (person, s.answer)
        assert s.answer not in s.candidates and set(s.candidates) <= {MOVE.fullmatch(f).group(2) for f in s.facts}
        by_point.setdefault((s.story_id, len(s.facts)), []).append(person)
    for (story, n), people in by_point.items():
        facts = next(s.facts for s in extra if s.story_id == story and len(s.facts) == n)
        assert sorted(people) == sorted({MOVE.fullmatch(f).group(1) for f in facts})  # each person once
    assert [s.story_id for s in extra] == sorted(s.story_id for s in extra)  # stories stay in order


def test_the_last_mentioned_place_pays_less_and_other_tasks_are_left_alone():
    samples = babi("qa1", "train")
    extra = ask_every_person(samples)

    def last_share(ss):
        return sum(MOVE.fullmatch(s.facts[-1]).group(2) == s.answer for s in ss) / len(ss)

    assert last_share(samples) > 0.5 > last_share(extra) + 0.05
    for task in ("qa2", "qa5"):  # not move stories with "Where is <person>?" questions
        assert ask_every_person(babi(task, "train")[:300]) == tuple(babi(task, "train")[:300])


def test_babilong_builds_prompts_from_given_samples():
    extra = ask_every_person(babi("qa1", "train")[:20])
    prompts = babilong("qa1", "0k", split="train", samples=extra, indices=[1, 0])
    assert [p.answer for p in prompts] == [extra[1].answer, extra[0].answer]
    assert prompts[0].prompt.endswith(f"Question: {extra[1].question} Answer:")
    with pytest.raises(DiffMambaError, match="out of range"):
        babilong("qa1", "0k", split="train", samples=extra, indices=[len(extra)])


@pytest.mark.parametrize("story_share", [0.0, 1.0])
def test_training_stream_reads_the_extra_questions(story_share):
    tok = build_subword_tokenizer()
    cfg = TrainConfig(arch="mamba2", d_model=16, n_layers=2, steps=10, batch_size=8, tasks=("qa1",), curriculum=1.0,
                      story_share=story_share, task_curriculum=0.0, every_person=True)
    stream = PromptStream(cfg, tok)
    assert len(stream.samples["qa1"]) > 2 * len(babi("qa1", "train"))
    asked = 0
    for step in range(3):
        ids, targets, _ = stream.batch(step)
        for r in range(ids.shape[0]):
            at = (targets[r] != -100).nonzero().flatten().tolist()
            text = tok.decode(ids[r, : at[-1] + 1].tolist())
            for pos, question in zip(at, re.findall(r"Where is ([A-Z][a-z]+)\? Answer:", text)):
                prefix = tok.decode(ids[r, : pos + 1].tolist())
                facts = re.findall(r"[A-Z][a-z]+ [a-z ]+ to the [a-z]+\.", prefix)
                assert tok.decode([targets[r, pos].item()]).strip() == last_place(facts, question)
                asked += 1
    assert asked > 20


def test_every_person_must_be_a_bool():
    with pytest.raises(DiffMambaError, match="--every-person"):
        TrainConfig(every_person="yes").check()
