"""The shipped models' recipe: the subword tokenizer, the BABILong training stream and the losses."""

import re
from dataclasses import asdict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from diffmamba_interp import HookedMamba
from diffmamba_interp.data import babi, babilong
from diffmamba_interp.data.subword import TAGS, VOCAB_SIZE, babi_words, build_subword_tokenizer
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.train import PromptStream, TrainConfig, answer_logits, stage_recipe, training_loss


@pytest.fixture(scope="module")
def tok():
    return build_subword_tokenizer()


def test_tokenizer_size_words_tags_and_round_trip(tok):
    assert len(tok) == VOCAB_SIZE and tok.unk_token_id is None  # byte-level: nothing is unknown
    words = babi_words()
    assert len(words) > 150 and {"kitchen", "Daniel", "football", "maybe"} <= set(words)
    ids = tok([" " + w for w in words], add_special_tokens=False)["input_ids"]
    assert all(len(i) == 1 for i in ids)  # every bAbI word (after a space) is one token: answers are one id
    for tag in TAGS:
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    for prompt in babilong("qa1", "0k", n=2) + babilong("qa2", "1k", n=1, tokenizer=tok):
        ids = tok(prompt.prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == prompt.prompt  # decoding gives the text back (generation is scored on text)
    book = "“Now, it is a fact, gentlemen,” said Mr. Wilson — naïve café."
    assert tok.decode(tok(book)["input_ids"]) == book


def test_tokenizer_is_deterministic_and_size_checked(tok):
    from diffmamba_interp.data import subword

    fresh = subword._trained.__wrapped__(VOCAB_SIZE)  # a second training, not the cached one
    assert fresh == subword._trained(VOCAB_SIZE)
    with pytest.raises(DiffMambaError, match="vocab_size"):
        build_subword_tokenizer(100)


def cfg(**kw):
    base = dict(arch="mamba2", d_model=16, n_layers=2, steps=10, batch_size=8, tasks=("qa1", "qa3"),
                lengths=(512, 1024), curriculum=0.5, filler_share=1.0, batch_tokens=4096, story_share=0.0,
                task_curriculum=0.0, first_task_share=0.5)
    return TrainConfig(**{**base, **kw})


def rows_of(tok, ids, targets):
    """Each row as (text up to its last answer, [answers as words])."""
    out = []
    for r in range(ids.shape[0]):
        at = (targets[r] != -100).nonzero().flatten()
        out.append((ids[r], at, [tok.decode([a]).strip() for a in targets[r, at].tolist()]))
    return out


def test_stream_curriculum_lengths_rows_and_padding(tok):
    c = cfg()
    stream = PromptStream(c, tok)
    assert len(stream.questions) == len(babi("qa1", "train")) + len(babi("qa3", "train"))
    for step in range(c.steps):
        ids, targets, length = stream.batch(step)
        if step < 5:
            assert length == 0 and ids.shape[0] <= 8  # the curriculum: 0k first
            assert ids.shape[0] >= 4 or ids.shape[0] * ids.shape[1] <= 4096  # few rows only for long prompts
        else:
            assert length in (512, 1024) and ids.shape[0] <= max(4, min(8, 4096 // length))
            assert ids.shape[1] > 0.5 * length  # filler reached most of the BABILong budget
        assert ((targets != -100).sum(1) == 1).all()  # one question per prompt
        for row, at, answers in rows_of(tok, ids, targets):
            last = int(at[0])
            assert row[last] != tok.pad_token_id and (row[last + 1:] == tok.pad_token_id).all()
            text = tok.decode(row[: last + 1])
            assert text.startswith("<context>") and text.endswith("Answer:")
            assert set(answers) <= set(babi_words())  # one-token answers


def test_story_batches_answer_every_question_of_a_story(tok):
    stream = PromptStream(cfg(curriculum=1.0, story_share=1.0, tasks=("qa1",)), tok)
    ids, targets, length = stream.batch(0)
    assert length == PromptStream.STORY and 1 <= ids.shape[0] <= 8
    samples = babi("qa1", "train")
    for row, at, answers in rows_of(tok, ids, targets):
        text = tok.decode(row[: int(at[-1]) + 2])  # up to and with the last answer
        blocks = text.split("\n<context>")
        assert len(blocks) == len(at) == 5  # qa1 stories have five questions
        questions = re.findall(r"Question: (.*?) Answer:", text)
        contexts = re.findall(r"<context> \n(.*?)\n</context>", text, re.S)
        facts = " ".join(c for c in contexts if c)  # every fact once, in order
        ends = {s.story_id for s in samples if " ".join(s.facts) == facts and s.question == questions[-1]}
        assert len(ends) >= 1
        mine = [s for s in samples if s.story_id == min(ends)]
        assert [s.question for s in mine] == questions and [s.answer for s in mine] == answers
        for b, s in zip(blocks, mine):
            assert b.rstrip().endswith(f"Answer: {s.answer}")
        for pos, answer in zip(at.tolist(), answers):
            assert tok.decode(row[: pos + 1]).endswith("Answer:") and tok.decode([int(row[pos + 1])]).strip() == answer


@pytest.mark.parametrize("story", [False, True])
def test_answer_end_follows_every_answer_with_a_scored_end_token(tok, story):
    """--answer-end: the same rows as without it, each answer then "." in the ids, and the "." a target
    at the answer's position; nothing else changes (the draw, the other targets)."""
    kw = dict(curriculum=1.0, story_share=float(story), tasks=("qa1",))
    plain_ids, plain_targets, _ = PromptStream(cfg(**kw), tok).batch(0)
    ids, targets, _ = PromptStream(cfg(**kw, answer_end=True), tok).batch(0)
    end = tok(".", add_special_tokens=False)["input_ids"]
    assert len(end) == 1 and ids.shape[0] == plain_ids.shape[0]
    for r in range(ids.shape[0]):
        plain_at = (plain_targets[r] != -100).nonzero().flatten().tolist()
        at = (targets[r] != -100).nonzero().flatten().tolist()
        assert len(at) == 2 * len(plain_at)
        answers, ends = at[0::2], at[1::2]
        assert [e - a for a, e in zip(answers, ends)] == [1] * len(answers)  # "." scored right after each answer
        assert (targets[r, ends] == end[0]).all() and (ids[r, [e + 1 for e in ends]] == end[0]).all()
        assert targets[r, answers].tolist() == plain_targets[r, plain_at].tolist()
        # without the end tokens the row starts as the plain one: a story row is it, a prompt row is it + the answer
        kept = torch.ones(ids.shape[1], dtype=torch.bool)
        kept[[e + 1 for e in ends]] = False
        row, plain = ids[r, kept], plain_ids[r][plain_ids[r] != tok.pad_token_id]
        assert torch.equal(row[: len(plain)], plain)
        assert story or (len(row[row != tok.pad_token_id]) == len(plain) + 1 and row[len(plain)] == targets[r, answers[0]])


def test_stream_sorts_batches_by_size_within_a_token_budget_and_draws_tasks_uniformly(tok):
    stream = PromptStream(cfg(curriculum=1.0, steps=100), tok)
    shapes, tasks = [], []
    for s in range(2 * PromptStream.POOL):
        ids, targets, _ = stream.batch(s)
        shapes.append(tuple(ids.shape))
        for row in ids:
            tasks.append("qa3" if tok.decode(row).count(". ") > 12 else "qa1")  # qa1 prompts have at most 10 facts
    widths = [w for _, w in shapes]
    assert max(widths) > 3 * min(widths)  # qa3 stories batch together, qa1 stories together
    assert all(r <= 8 and (r * w <= 1.5 * 4096 or r <= 4) for r, w in shapes)  # long batches have few rows (0k)
    assert 0.2 < tasks.count("qa3") / len(tasks) < 0.8  # tasks drawn by weight, 1/2 here (qa3 is 1/11 of the questions)


def test_task_curriculum_then_first_task_share(tok):
    c = cfg(tasks=("qa1", "qa2", "qa4"), task_curriculum=0.3, first_task_share=0.4, steps=100, curriculum=1.0)
    stream = PromptStream(c, tok)
    assert stream.task_weights(0) == stream.task_weights(29) == [1.0, 0.0, 0.0]
    assert stream.task_weights(30) == pytest.approx([0.4, 0.3, 0.3])
    early = [q for s in range(3) for q in stream.draw(0, s)]
    assert {task for task, _ in early} == {"qa1"}
    late = [q for s in range(30, 60) for q in stream.draw(0, s)]
    share = {t: sum(task == t for task, _ in late) / len(late) for t in c.tasks}
    assert share["qa1"] == pytest.approx(0.4, abs=0.1) and share["qa4"] == pytest.approx(0.3, abs=0.1)


def test_one_task_stream_and_its_card_words(tok):
    c = cfg(tasks=("qa5",), first_task_share=0.0, steps=100, curriculum=1.0)  # `--tasks qa5`: the share is moot
    stream = PromptStream(c, tok)
    assert stream.task_weights(0) == stream.task_weights(99) == [1.0]
    assert {task for s in range(3) for task, _ in stream.draw(0, s)} == {"qa5"}
    assert "every row is qa5" in stage_recipe(asdict(c)) and "other tasks" not in stage_recipe(asdict(c))


def test_a_continued_stage_reads_new_batches_and_stage_0_is_unchanged(tok):
    c = cfg(curriculum=0.0, steps=4)  # filler from the first step: the filler draw is seeded too
    first = [PromptStream(c, tok).batch(s)[0] for s in range(2)]
    again = [PromptStream(c, tok, stage=0).batch(s)[0] for s in range(2)]
    second = [PromptStream(c, tok, stage=1).batch(s)[0] for s in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # from scratch: the same stream as before
    assert not any(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second))


def test_bad_training_options_are_refused():
    for kw, word in ((dict(loss="mse"), "--loss"), (dict(filler_share=2.0), "--filler-share"),
                     (dict(curriculum=-0.1), "--curriculum"), (dict(lengths=(0,)), "--lengths"),
                     (dict(lengths=(10**6,)), "--lengths"), (dict(story_share=1.5), "--story-share"),
                     (dict(task_curriculum=2), "--task-curriculum"), (dict(first_task_share=-1), "--first-task-share"),
                     (dict(d_conv=0), "--d-conv"), (dict(every_person=1), "--every-person"),
                     (dict(tasks=("qa9",)), "--tasks"), (dict(tasks=()), "--tasks")):
        with pytest.raises(DiffMambaError, match=word):
            cfg(**kw).check()


def test_conv_width_reaches_the_model(tok):
    model = HookedMamba(cfg(d_conv=6).model_config(len(tok)))
    assert model.cfg.d_conv == 6 and all(b.mixer.conv1d.kernel_size == (6,) for b in model.blocks)


@pytest.fixture
def tiny(tok):
    torch.manual_seed(0)
    return HookedMamba(cfg(vocab_size=len(tok)).model_config(len(tok))).double()


def test_answer_logits_equal_the_full_forward(tok, tiny):
    ids, targets, _ = PromptStream(cfg(), tok).batch(0)
    last = (targets != -100).int().argmax(1)
    full = tiny(ids)
    assert torch.allclose(answer_logits(tiny, ids, last), full[torch.arange(len(last)), last], atol=1e-12)


@pytest.mark.parametrize("story", [False, True])
def test_loss_is_answer_loss_plus_weighted_next_token_loss_without_padding(tok, tiny, story):
    ids, targets, _ = PromptStream(cfg(story_share=float(story), curriculum=1.0), tok).batch(1)
    lengths = [(row != tok.pad_token_id).sum() for row in ids]
    assert min(lengths) < ids.shape[1]  # some rows are padded
    ce_answer, terms = [], []
    for r in range(ids.shape[0]):  # each row alone, unpadded
        row = ids[r, : lengths[r]][None]
        logits = tiny(row)[0]
        at = (targets[r, : lengths[r]] != -100).nonzero().flatten()
        ce_answer.append(F.cross_entropy(logits[at], targets[r, at], reduction="none"))
        terms.append(F.cross_entropy(logits[:-1], row[0, 1:], reduction="none"))
    answer_only = torch.cat(ce_answer).mean()
    got = training_loss(tiny, cfg(loss="lm", lm_weight=0.25), ids, targets, tok.pad_token_id)
    assert torch.allclose(got, answer_only + 0.25 * torch.cat(terms).mean(), atol=1e-10)
    assert torch.allclose(training_loss(tiny, cfg(), ids, targets, tok.pad_token_id), answer_only, atol=1e-10)


def test_card_targets_line_says_which_targets_a_run_reached():
    from diffmamba_interp.train import targets_line

    rows = [{"task": f"qa{i}", "length": 0, "n": 10, "accuracy": a} for i, a in zip(range(1, 6), (0.96, 0.9, 0.8, 0.8, 0.6))]
    line = targets_line(pd.DataFrame(rows + [{"task": "qa1", "length": 1024, "n": 10, "accuracy": 0.5}]))
    assert "qa1 0.960 (target 0.95: reached)" in line
    assert "mean 0.812 (target 0.80: reached)" in line
    assert "qa1 @ 1k 0.500 (target 0.80: not reached)" in line
    assert targets_line(pd.DataFrame(rows)) == ""  # qa1 at 1k not measured: no line


def test_card_gives_each_stage_its_recipe_command_and_wall_time():

    from diffmamba_interp.train import TrainResult, model_card

    acc = pd.DataFrame([{"task": "qa1", "length": 0, "n": 10, "accuracy": 0.9}])
    stage1 = {**asdict(cfg(steps=4800, curriculum=0.3, task_curriculum=0.3, first_task_share=0.4)),
              "command": "train --steps 4800", "wall_s": 1554.1}
    stage2 = cfg(steps=1600, init="models/m", curriculum=0.0, task_curriculum=0.0, first_task_share=0.1)
    card = model_card(TrainResult(stage2, 100, 10, 663.3, 0.5, acc, [stage1]), "train --init models/m --steps 1600")
    one, two = (line for line in card.splitlines() if line.startswith("- stage "))
    assert one.startswith("- stage 1: 4800 steps, lr 0.003, 25.9 min: the first 30% of the steps at 0k")
    assert "the first 30% of the steps read qa1 only, then 40% of the rows are qa1" in one
    assert one.endswith("command `train --steps 4800`")
    assert two.startswith("- stage 2: 1600 steps, lr 0.003, continuing from models/m, 11.1 min: from the first step, 100% "
                          "of the batches with public-domain book filler")
    assert "from the first step, 10% of the rows are qa1" in two and two.endswith("command `train --init models/m --steps 1600`")
    assert "the first 0% of the steps" not in card and "in 2 stages" in card
    assert "- wall time: 37.0 min in all: stage 1 25.9 min, stage 2 11.1 min on CPU" in card
    assert "seed: 0; steps: 6400 in all (4800 + 1600); lr: each stage's above (warm-up 100, cosine, restarted" in card

    missing = {k: v for k, v in stage1.items() if k not in ("lr", "wall_s", "task_curriculum", "command")}
    card = model_card(TrainResult(stage2, 100, 10, 663.3, 0.5, acc, [missing]), "train --init models/m")
    assert "- stage 1: 4800 steps, lr ?, ? min: the first 30% of the steps at 0k" in card
    assert "the first ? of the steps read qa1 only" in card and "command `?`" in card
    assert "- wall time: ? min in all: stage 1 ? min, stage 2 11.1 min on CPU" in card

    single = model_card(TrainResult(cfg(), 100, 10, 60.0, 0.5, acc), "train")
    assert "in BABILong form: the first 50% of the steps at 0k, then 100% of the batches with public-domain book filler" in single
    assert "- command: `train`\n- seed: 0; steps: 10; " in single and "- stage " not in single
    assert "- wall time: 1.0 min on CPU" in single
