"""Tests for diffmamba_interp.data: bAbI parsing, BABILong prompts, data specs, the bAbI tokenizer."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

import diffmamba_interp
from diffmamba_interp.data import (
    DATA_DIR, FILLER_DIR, TEMPLATE, BabiSample, DataSpec, Prompt, available_tasks, babi, babilong,
    build_babi_tokenizer, count_tokens, format_prompt, load_data, parse_data_spec, pretokenize,
    training_stream,
)
from diffmamba_interp.data.babi import babi_path
from diffmamba_interp.errors import DiffMambaError

# the functions babi/babilong shadow their modules' names on the package: import the modules by path
babi_module = importlib.import_module("diffmamba_interp.data.babi")
babilong_module = importlib.import_module("diffmamba_interp.data.babilong")
tokenizer_module = importlib.import_module("diffmamba_interp.data.tokenizer")
books_module = importlib.import_module("diffmamba_interp.data.books")
spec_module = importlib.import_module("diffmamba_interp.data.spec")

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
PEOPLE = {"John", "Mary", "Sandra", "Daniel", "Fred", "Jeff", "Bill"}
OBJECTS = {"milk", "football", "apple"}
DIRECTIONS = {"north", "south", "east", "west"}


@pytest.fixture(scope="module")
def tok():
    return build_babi_tokenizer()


def context_sentences(prompt: str) -> list[str]:
    """The sentences between <context> and </context> of a template prompt."""
    body = prompt.split("<context> \n", 1)[1].split("\n</context>", 1)[0]
    return re.split(r"(?<=[.!?]) ", body)


# ---------------------------------------------------------------- shipped files and bAbI parsing


def test_shipped_files_and_license():
    assert DATA_DIR.is_relative_to(pathlib.Path(diffmamba_interp.__file__).resolve().parent)
    assert "Attribution 3.0" in (DATA_DIR / "LICENSE.txt").read_text()
    assert (DATA_DIR / "README.txt").is_file()
    # issue 13: the test files of all 20 tasks are shipped (was qa1-qa5)
    assert available_tasks() == [f"qa{i}" for i in range(1, 21)]
    for task in TASKS:
        for split in ("train", "test"):
            assert babi_path(task, split).is_relative_to(DATA_DIR)
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 11_000_000  # was 10 MB before the 15 extra test files (2.3 MB)


def test_first_qa1_test_story_hand_checked():
    samples = babi("qa1")
    assert len(samples) == 1000
    first, second, third = samples[:3]
    assert first == BabiSample(
        task="qa1", facts=("John travelled to the hallway.", "Mary journeyed to the bathroom."),
        question="Where is John?", answer="hallway", supporting=(0,), candidates=("bathroom",), story_id=0)
    # second question: lines 1, 2, 4, 5 (the first question, line 3, is dropped)
    assert second.facts == ("John travelled to the hallway.", "Mary journeyed to the bathroom.",
                            "Daniel went back to the bathroom.", "John moved to the bedroom.")
    assert (second.question, second.answer, second.supporting) == ("Where is Mary?", "bathroom", (1,))
    assert second.candidates == ("bedroom", "hallway")
    # third: supporting line 8 -> index 5 of lines 1, 2, 4, 5, 7, 8
    assert third.facts[third.supporting[0]] == "Sandra journeyed to the kitchen."
    assert third.supporting == (5,) and third.answer == "kitchen"
    # a new story starts at the sixth question
    assert samples[5].story_id == 1 and samples[5].facts[0] == "Sandra travelled to the kitchen."


def test_qa2_multiple_supporting_facts_in_given_order():
    s = babi("qa2")[2]
    assert s.question == "Where is the football?" and s.answer == "hallway"
    assert s.supporting == (6, 5)
    assert [s.facts[i] for i in s.supporting] == ["John put down the football.", "John went to the hallway."]
    assert babi("qa2")[0].candidates == ("bedroom", "kitchen")


def test_qa5_candidates_are_same_kind():
    samples = babi("qa5")
    what, who = samples[0], samples[1]
    assert (what.question, what.answer, what.candidates) == ("What did Fred give to Jeff?", "football", ())
    assert (who.question, who.answer, who.candidates) == ("Who gave the football to Jeff?", "Fred", ("Bill", "Jeff"))
    for s in samples[:200]:
        words = set(re.findall(r"[A-Za-z]+", " ".join(s.facts)))
        assert s.answer not in s.candidates
        assert set(s.candidates) <= words
        kinds = PEOPLE if s.answer in PEOPLE else OBJECTS
        assert set(s.candidates) <= kinds


def test_every_sample_is_consistent():
    for task in TASKS:
        for s in babi(task)[:300]:
            assert s.task == task and s.facts and s.question.endswith("?")
            assert all(0 <= i < len(s.facts) for i in s.supporting)
            assert all("\t" not in f and "|" not in f for f in s.facts)


def test_train_sizes_and_task_forms():
    assert len(babi("qa1", "train")) == 10_000  # en-10k preferred
    assert len(babi("qa1", "train", size="1k")) == 1000
    assert len(babi("qa3", "train")) == 1000  # no en-10k qa3: falls back to en
    assert babi_path("qa3", "train").parent.name == "en"
    assert babi(1)[:3] == babi("QA1")[:3] == babi("1")[:3]
    with pytest.raises(DiffMambaError, match="qa3.*en-10k has: qa1, qa2, qa4, qa5"):
        babi("qa3", "train", size="10k")


@pytest.mark.parametrize("kwargs, expected", [
    ({"task": "qa7", "split": "train"}, r"no train file for bAbI qa7 shipped \(available splits: test\)"),
    ({"task": "qa21"}, r"unknown bAbI task 'qa21'.*qa1, qa2, qa3, qa4, qa5"),
    ({"task": "foo"}, r"unknown bAbI task 'foo'"),
    ({"task": "qa1", "split": "dev"}, r"unknown bAbI split 'dev' for qa1"),
    ({"task": "qa1", "size": "5k"}, r"unknown bAbI size '5k'"),
])
def test_babi_errors(kwargs, expected):
    with pytest.raises(DiffMambaError, match=expected) as info:
        babi(**kwargs)
    assert "\n" not in str(info.value)


def test_data_dir_reads_another_release(tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "qa6_yes-no-questions_test.txt").write_text(
        "1 Mary moved to the bathroom.\n2 Is Mary in the bathroom? \tyes\t1\n")
    [s] = babi("qa6", data_dir=tmp_path)
    assert (s.question, s.answer, s.supporting, s.candidates) == ("Is Mary in the bathroom?", "yes", (0,), ())
    with pytest.raises(DiffMambaError, match="not a directory"):
        babi("qa1", data_dir=tmp_path / "missing")


# ---------------------------------------------------------------- BABILong prompts and filler


def test_prompt_template_exact():
    p = babilong("qa1", n=1)[0]
    assert p.prompt == ("<context> \nJohn travelled to the hallway. Mary journeyed to the bathroom.\n"
                        "</context>\n\nQuestion: Where is John? Answer:")
    assert isinstance(p, Prompt) and p.answer == "hallway" and p.target == " hallway"
    assert p.candidates == ("bathroom",) and p.task == "qa1"
    assert p.meta["n_filler"] == 0 and p.meta["supporting_facts"] == ("John travelled to the hallway.",)
    assert TEMPLATE.format(facts="A. B.", question="Q?") == format_prompt(["A.", "B."], "Q?")
    assert len(babilong("qa1")) == 1000 and babilong("qa1", n=0) == []


@pytest.mark.parametrize("task, length", [("qa1", "1k"), ("qa2", "2k"), ("qa4", 700), ("qa5", "1k")])
def test_filler_reaches_length_and_keeps_facts(task, length):
    # issue 13: facts + filler fill length - 300 tokens (BABILong's budget; was: the whole prompt
    # reaches length), and the bAbI-distractor filler is filler="babi" (the default is now books)
    budget = babilong_module.parse_length(length) - 300
    samples = babi(task)[:15]
    prompts = babilong(task, length, n=15, filler="babi")
    pool = babilong_module._task_filler(babilong_module.FILLER_TASKS.get(task, "qa4"))
    longest_filler = max(len(pretokenize(s)) for s in pool)
    for s, p in zip(samples, prompts):
        n_tokens = count_tokens(p.prompt)
        context = len(pretokenize(" ".join(context_sentences(p.prompt))))
        assert n_tokens == p.meta["n_tokens"] and budget <= context < budget + longest_filler
        sentences = context_sentences(p.prompt)
        positions = p.meta["fact_positions"]
        assert list(positions) == sorted(positions)
        assert tuple(sentences[i] for i in positions) == s.facts  # facts in order, none lost
        assert len(sentences) == len(s.facts) + p.meta["n_filler"] > len(s.facts)
        assert p.prompt.endswith(f"\n</context>\n\nQuestion: {s.question} Answer:")


def test_filler_positions_vary_within_a_prompt():
    p = babilong("qa1", "2k", n=1, filler="babi")[0]
    positions = p.meta["fact_positions"]
    assert positions[0] > 0 and positions[-1] < len(context_sentences(p.prompt)) - 1


def test_filler_deterministic_with_seed():
    a = babilong("qa2", "1k", n=5, seed=0)
    assert a == babilong("qa2", "1k", n=5, seed=0)
    assert a[:3] == babilong("qa2", "1k", n=3, seed=0)  # first n is a prefix
    b = babilong("qa2", "1k", n=5, seed=1)
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    assert [x.answer for x in a] == [y.answer for y in b]


@pytest.mark.parametrize("task", TASKS)
def test_babi_filler_cannot_change_the_answer(task, tok):
    prompts = babilong(task, "1k", n=20, filler="babi")  # issue 13: no longer the default
    vocab = tok.get_vocab()
    filler_seen = 0
    for p in prompts:
        fact_positions = set(p.meta["fact_positions"])
        filler = [s for i, s in enumerate(context_sentences(p.prompt)) if i not in fact_positions]
        filler_seen += len(filler)
        for sentence in filler:
            words = set(pretokenize(sentence))
            assert words <= vocab.keys()
            if task == "qa4":  # qa1 filler: movements, never a direction relation
                assert not words & DIRECTIONS and re.fullmatch(r"[A-Z][a-z]+ [a-z ]+ the [a-z]+\.", sentence)
            else:  # qa4 filler: direction relations, never a person or an object
                assert not words & (PEOPLE | OBJECTS)
                assert re.fullmatch(r"The [a-z]+ is (north|south|east|west) of the [a-z]+\.", sentence)
        assert tok.unk_token_id not in tok(p.prompt)["input_ids"]
    assert filler_seen > 0 or task == "qa3"  # qa3 stories can already exceed 1k tokens


def test_filler_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First line one. Second\nline two!  Third line three?\n\nFourth line four.")
    prompts = babilong("qa1", 380, filler=path, n=3)  # 380 - 300 reserved: 80 tokens of facts + filler
    for p in prompts:
        fact_positions = set(p.meta["fact_positions"])
        filler = [s for i, s in enumerate(context_sentences(p.prompt)) if i not in fact_positions]
        assert filler and p.meta["n_tokens"] >= 80
        book = ["First line one.", "Second line two!", "Third line three?", "Fourth line four."]
        start = book.index(filler[0])  # consecutive sentences, wrapping around
        assert filler == [book[(start + k) % 4] for k in range(len(filler))]
    missing = tmp_path / "nope.txt"
    with pytest.raises(DiffMambaError, match=re.escape(str(missing))):
        babilong("qa1", "1k", filler=missing)
    with pytest.raises(DiffMambaError, match="nope.txt"):
        babilong("qa1", "0k", filler=missing)


def test_filler_counts_with_a_given_tokenizer():
    class CharTokenizer:  # not additive over sentences: one token per character
        def encode(self, text, add_special_tokens=False):
            return list(text)

    prompts = babilong("qa1", 3000, tokenizer=CharTokenizer(), n=3)
    for p in prompts:  # 300 of the 3000 are left for template and question, as BABILong reserves
        body = " ".join(context_sentences(p.prompt))
        assert p.meta["n_tokens"] == len(p.prompt) and len(" " + body) >= 2700


def test_bad_length():
    with pytest.raises(DiffMambaError, match="bad BABILong length '1m'"):
        babilong("qa1", "1m")
    assert babilong_module.parse_length("4k") == 4096 and babilong_module.parse_length(0) == 0


def test_training_stream():
    pairs = list(training_stream(tasks=("qa1", "qa3"), split="train"))
    assert len(pairs) == 11_000
    prompt, answer = pairs[0]
    first = babi("qa1", "train")[0]
    assert prompt == format_prompt(first.facts, first.question) and answer == first.answer
    shuffled = list(training_stream(tasks=("qa1", "qa3"), shuffle=True, seed=3))
    assert shuffled == list(training_stream(tasks=("qa1", "qa3"), shuffle=True, seed=3))
    assert shuffled != pairs and sorted(shuffled) == sorted(pairs)


# ---------------------------------------------------------------- data specs


def test_data_specs(tmp_path):
    assert parse_data_spec("babi:qa1") == DataSpec("babi", task="qa1", split="test")
    assert parse_data_spec("babi:qa1:train") == DataSpec("babi", task="qa1", split="train")
    assert parse_data_spec("babilong:qa2:1k") == DataSpec("babilong", task="qa2", split="test", length=1024)
    assert parse_data_spec("babilong:3:500:train") == DataSpec("babilong", task="qa3", split="train", length=500)

    # issue 13: load_data samples n with the seed (was: the first n)
    picked = spec_module.sample_indices(1000, 4, 0, "qa1:test")
    assert load_data("babi:qa1", n=4) == babilong("qa1", "0k", indices=picked)
    assert load_data("babi:qa1") == babilong("qa1", "0k")  # all: file order
    train = load_data("babi:qa1:train", n=2)
    first = spec_module.sample_indices(10_000, 2, 0, "qa1:train")[0]
    assert train[0].answer == babi("qa1", "train")[first].answer and train[0].meta["split"] == "train"
    long = load_data("babilong:qa2:1k", n=2, seed=5)
    assert long == babilong("qa2", "1k", seed=5, indices=spec_module.sample_indices(1000, 2, 5, "qa2:test"))
    assert all(p.meta["n_tokens"] >= 1024 - 300 for p in long)

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a b", "answer": "c", "candidates": ["d"], "id": 7}\n\n'
                    '{"prompt": "e", "answer": "f"}\n')
    rows = load_data(f"jsonl:{path}")
    assert [(p.prompt, p.answer, p.candidates) for p in rows] == [("a b", "c", ("d",)), ("e", "f", ())]
    assert rows[0].meta["id"] == 7 and rows[1].meta["line"] == 3
    assert len(load_data(f"jsonl:{path}", n=1)) == 1


@pytest.mark.parametrize("spec, expected", [
    ("hf:foo", r"unknown data spec 'hf:foo'.*babi:TASK"),
    ("qa1", r"unknown data spec 'qa1'"),
    ("babi:qa9:train", r"no train file for bAbI qa9 shipped"),
    ("babi:qa1:dev", r"unknown split 'dev'"),
    ("babi:", r"expected babi:TASK"),
    ("babi:qa1:train:x", r"expected babi:TASK\[:SPLIT\]"),
    ("babilong:qa2", r"expected babilong:TASK:LENGTH"),
    ("babilong:qa2:big", r"bad BABILong length 'big'"),
    ("jsonl:", r"names no file"),
])
def test_bad_specs(spec, expected):
    with pytest.raises(DiffMambaError, match=expected) as info:
        load_data(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', r"line 2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n', r"line 3: missing field 'answer'"),
    ('[1, 2]\n', r"line 1: expected a JSON object"),
    ('{"prompt": "a", "answer": 3}\n', r"line 1: field 'answer' must be a string"),
    ('{"prompt": "a", "answer": "b", "candidates": "c"}\n', r"line 1: field 'candidates'"),
])
def test_bad_jsonl(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DiffMambaError, match=expected):
        load_data(f"jsonl:{path}")
    with pytest.raises(DiffMambaError, match="does not exist"):
        load_data(f"jsonl:{tmp_path / 'missing.jsonl'}")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_splits_template(tok):
    prompt = babilong("qa1", n=1)[0].prompt
    tokens = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
    assert tokens[:7] == ["<context>", "\n", "John", "travelled", "to", "the", "hallway"]
    assert tokens[-13:] == [".", "\n", "</context>", "\n", "\n", "Question", ":", "Where", "is", "John", "?",
                            "Answer", ":"]
    assert tokens == pretokenize(prompt)
    odd = "John  went\tto the\n\nkitchen ."
    assert tok.convert_ids_to_tokens(tok(odd)["input_ids"]) == pretokenize(odd) == \
        ["John", "went", "to", "the", "\n", "\n", "kitchen", "."]
    assert count_tokens(prompt, tok) == count_tokens(prompt)
    assert tok.convert_ids_to_tokens(tok("Zorg")["input_ids"]) == ["<unk>"]


def test_tokenizer_vocab(tok):
    vocab = tok.get_vocab()
    assert 50 <= len(vocab) <= 500
    assert [vocab[t] for t in ("<pad>", "<unk>", "<|endoftext|>")] == [0, 1, 2]
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])][3:]
    assert words == sorted(words)
    assert {"<context>", "</context>", "\n", "Question", "Answer", ":", ".", "?"} <= vocab.keys()
    assert build_babi_tokenizer().get_vocab() == vocab


def test_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    auto = AutoTokenizer.from_pretrained(tmp_path)
    from_file = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for p in babilong("qa5", "1k", n=3, filler="babi") + babilong("qa3", n=3):
        ids = tok(p.prompt)["input_ids"]
        assert auto(p.prompt)["input_ids"] == ids == from_file(p.prompt)["input_ids"]
        decoded = auto.decode(ids)  # tokens joined by single spaces
        assert decoded == " ".join(pretokenize(p.prompt))
    assert auto.eos_token_id == tok.eos_token_id and auto.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_is_one_token(task, tok):
    answers = {s.answer for split in ("train", "test") for s in babi(task, split, size="1k")}
    assert answers
    for answer in answers:
        ids = tok.encode(" " + answer, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
        assert ids == tok.encode(answer, add_special_tokens=False)
    prompts = babilong(task)
    for p, ids in zip(prompts, tok([p.prompt for p in prompts])["input_ids"]):
        if p.answer in pretokenize(p.prompt):  # the same id as the word inside the prompt
            assert tok.convert_tokens_to_ids(p.answer) in ids


# ---------------------------------------------------------------- no path outside the package


def test_reads_only_package_files(monkeypatch, tmp_path):
    read: list[pathlib.Path] = []
    original = pathlib.Path.read_text

    def spy(self, *args, **kwargs):
        read.append(self.resolve())
        return original(self, *args, **kwargs)

    original_bytes = pathlib.Path.read_bytes

    def spy_bytes(self, *args, **kwargs):
        read.append(self.resolve())
        return original_bytes(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", spy)
    monkeypatch.setattr(pathlib.Path, "read_bytes", spy_bytes)
    monkeypatch.chdir(tmp_path)
    for cached in (babi_module._index, babi_module._parse_file, babilong_module._task_filler,
                   tokenizer_module.babi_vocab, tokenizer_module.babi_texts, books_module._book_sentences):
        cached.cache_clear()
    babilong("qa1", "1k", n=2)
    babilong("qa4", "1k", n=2, filler="babi")
    babi("qa2", "train", size="1k")
    tokenizer_module.babi_vocab()
    package = pathlib.Path(diffmamba_interp.__file__).resolve().parent
    # issue 13: the filler books are package data too (FILLER_DIR, next to DATA_DIR)
    assert any(p.is_relative_to(FILLER_DIR) for p in read)
    assert read and all((p.is_relative_to(DATA_DIR) or p.is_relative_to(FILLER_DIR)) and p.is_relative_to(package)
                        for p in read)
    assert not any("shared" in p.parts for p in read)
