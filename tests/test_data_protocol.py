"""Issue 13 (the paper's SNR protocol) and the data cases of issue 17: shipped test files and books,
BABILong with book filler and a 128k cap, several lengths, seeded sampling, the paper preset,
story ids, one-line errors for bad input."""

from __future__ import annotations

import importlib
import random
import re
import time
import tracemalloc

import pytest

import diffmamba_interp.data as data_pkg
from diffmamba_interp.data import (
    DATA_DIR, FILLER_DIR, MAX_LENGTH, DataSpec, available_tasks, babi, babilong, count_tokens, filler_sentences,
    load_data, paper_prompts, parse_data_spec, parse_lengths, pretokenize, split_sentences, training_stream,
)
from diffmamba_interp.errors import DiffMambaError

babilong_module = importlib.import_module("diffmamba_interp.data.babilong")
books_module = importlib.import_module("diffmamba_interp.data.books")
paper_module = importlib.import_module("diffmamba_interp.data.paper")
spec_module = importlib.import_module("diffmamba_interp.data.spec")

ALL_TASKS = [f"qa{i}" for i in range(1, 21)]
FIRST_BOOK_SENTENCE = ("It is a truth universally acknowledged, that a single man in possession of a good "
                       "fortune must be in want of a wife.")


def context_sentences(prompt: str) -> list[str]:
    body = prompt.split("<context> \n", 1)[1].split("\n</context>", 1)[0]
    return re.split(r"(?<=[.!?”’]) (?=\S)", body) if body else []


def book_filler(p, count=lambda s: len(pretokenize(s)), min_tokens=10) -> list[int]:
    """Walk a book-filler prompt's context: facts where ``fact_positions`` says, and between them
    book sentences that must be consecutive in `filler_sentences('books')` except for skipped
    sentences under ``min_tokens``. Returns the book indices of the filler, in prompt order."""
    pool = filler_sentences("books")
    facts, positions = p.meta["facts"], p.meta["fact_positions"]
    body = p.prompt.split("<context> \n", 1)[1].rsplit("\n</context>", 1)[0]
    pos = index = done = 0
    k = None
    found: list[int] = []
    while pos < len(body):
        if done < len(facts) and positions[done] == index:
            piece = facts[done]
            done += 1
        else:
            if k is None:
                k = next(i for i, x in enumerate(pool) if count(x) >= min_tokens and body.startswith(x, pos))
            else:
                k = (k + 1) % len(pool)
                while count(pool[k]) < min_tokens:
                    k = (k + 1) % len(pool)
            piece = pool[k]
            found.append(k)
        assert body.startswith(piece, pos), (piece, body[pos:pos + 80])
        pos += len(piece)
        index += 1
        if pos < len(body):
            assert body[pos] == " "
            pos += 1
    assert done == len(facts)
    return found


def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(DiffMambaError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- 1. shipped bAbI test files


def test_all_twenty_test_files_are_shipped():
    assert available_tasks() == ALL_TASKS
    for task in ALL_TASKS:
        samples = babi(task, "test")
        assert len(samples) == 1000, task
        assert all(s.task == task and s.question and s.answer for s in samples)
    # hand-checked against the files: first question of qa20 and qa6
    first20 = babi("qa20")[0]
    assert (first20.facts, first20.question, first20.answer) == (("Jason is thirsty.",), "Where will jason go?", "kitchen")
    qa6 = babi("qa6")[0]
    assert (qa6.question, qa6.answer, qa6.supporting) == ("Is John in the kitchen?", "no", (1,))
    assert qa6.facts == ("Mary got the milk there.", "John moved to the bedroom.")
    notice = (DATA_DIR / "NOTICE.txt").read_text()
    assert "qa1-qa20 test" in notice and "CC BY 3.0" in notice
    assert "Attribution 3.0" in (DATA_DIR / "LICENSE.txt").read_text()


def test_train_files_are_still_there():
    assert len(babi("qa3", "train")) == 1000 and len(babi("qa5", "train")) == 10_000
    assert len(babi("qa2", "train", size="1k")) == 1000


# ---------------------------------------------------------------- 2. books and sentences


def test_books_shipped_stripped_with_license_and_readme():
    readme = (FILLER_DIR / "README.txt").read_text()
    for file, title in [("pg1342.txt", "Pride and Prejudice"), ("pg84.txt", "Frankenstein"),
                        ("pg1661.txt", "The Adventures of Sherlock Holmes")]:
        assert file in readme and title in readme
        text = (FILLER_DIR / file).read_text(encoding="utf-8")
        assert 400_000 < len(text) < 700_000
        for junk in ("Gutenberg", "GUTENBERG", "[Illustration", "CHAPTER", "Contents", "CONTENTS", "PREFACE",
                     "_", "CHISWICK", "^{", "\r"):
            assert junk not in text, (file, junk)
        assert not re.search(r"^(Chapter|Letter) \d+$", text, re.M)
    assert "PUBLIC DOMAIN" in (FILLER_DIR / "LICENSE.txt").read_text()
    assert (FILLER_DIR / "pg1342.txt").read_text().startswith(FIRST_BOOK_SENTENCE + "\n\n")
    assert (FILLER_DIR / "pg84.txt").read_text().startswith("To Mrs. Saville, England.\n\nSt. Petersburgh, Dec. 11th")
    assert (FILLER_DIR / "pg1661.txt").read_text().startswith("To Sherlock Holmes she is always the woman. ")
    total = sum(p.stat().st_size for p in FILLER_DIR.iterdir())
    assert total < 2_000_000


def test_prepare_book_rules():
    raw = ("The Project Gutenberg eBook of Test\n\n*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n"
           "TEST BOOK\n\nContents\n  Chapter 1\n\n\nChapter 1\n\nIt was a _dark_ night. The rain\nfell.\n\n"
           "[Illustration: “A caption” [_Copyright 1894._]]\n\n"
           "CHAPTER II.\n\nShe said [as noted] that\n\n[Illustration]\n\nit rained.\n\nPRINTED BY X.\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nlicense text\n")
    book = books_module.Book("t.txt", "Test", "Nobody", 0, start=r"^Chapter 1$", end=r"^PRINTED BY")
    assert books_module.prepare_book(raw, book) == (
        "It was a dark night. The rain fell.\n\nShe said [as noted] that it rained.\n")
    with pytest.raises(DiffMambaError, match="start marker"):
        books_module.prepare_book("nothing here", book)


@pytest.mark.parametrize("text, expected", [
    ("Mr. Bennet replied that he had not. “But it is,” returned she.",
     ["Mr. Bennet replied that he had not.", "“But it is,” returned she."]),
    ("“Do you?” cried his wife. “Yes!” He left. Then Dr. J. H. Watson came at 3 p.m. on Dec. 11th.",
     ["“Do you?” cried his wife.", "“Yes!”", "He left.", "Then Dr. J. H. Watson came at 3 p.m. on Dec. 11th."]),
    ("It was I. Then she\nwent home...  Why?\n\nA new paragraph\nwithout a stop",
     ["It was I.", "Then she went home...", "Why?", "A new paragraph without a stop"]),
    ("He lived at No. 221B Baker Street. St. Petersburgh is cold.",
     ["He lived at No. 221B Baker Street.", "St. Petersburgh is cold."]),
    ("", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_filler_sentences_sources(tmp_path):
    books = filler_sentences("books")
    assert books is filler_sentences() and len(books) > 15_000
    assert books[0] == FIRST_BOOK_SENTENCE
    assert books[1].startswith("However little known the feelings")
    assert "Farewell.”" in books  # end of Frankenstein, second book
    assert books[-1].startswith("As to Miss Violet Hunter, my friend Holmes")  # end of Sherlock Holmes
    qa4_facts = filler_sentences("babi")
    assert qa4_facts == filler_sentences("babi", task="qa1") == tuple(sorted(qa4_facts))
    assert "The kitchen is north of the garden." in qa4_facts
    qa1_facts = filler_sentences("babi", task="qa4")
    assert "John travelled to the hallway." in qa1_facts and not set(qa1_facts) & set(qa4_facts)
    path = tmp_path / "t.txt"
    path.write_text("One fish. Two fish!\n\nRed fish", encoding="utf-8")
    assert filler_sentences(path) == filler_sentences(str(path)) == ("One fish.", "Two fish!", "Red fish")
    one_line_error(filler_sentences, tmp_path / "none.txt", match="does not exist")


# ---------------------------------------------------------------- 3. BABILong with book filler


def test_default_filler_is_books_in_reading_order():
    pool = filler_sentences("books")
    for p, s in zip(babilong("qa1", "2k", n=3), babi("qa1")[:3]):
        assert p.meta["filler"] == "books" and p.meta["facts"] == s.facts
        positions = p.meta["fact_positions"]
        assert list(positions) == sorted(positions) and len(positions) == len(s.facts)
        idx = book_filler(p)  # consecutive book sentences, skipping only those under 10 tokens
        assert len(idx) == p.meta["n_filler"] > 10
        assert all(b == a + 1 or all(len(pretokenize(pool[k])) < 10 for k in range(a + 1, b))
                   for a, b in zip(idx, idx[1:]) if b > a)
        assert all(len(pretokenize(pool[k])) >= 10 for k in idx)
    starts = {book_filler(p)[0] for p in babilong("qa1", "1k", n=5)}
    assert len(starts) == 5  # a random starting sentence per question


@pytest.mark.parametrize("task, length", [("qa1", "1k"), ("qa2", "4k"), ("qa5", 2000), ("qa20", "8k")])
def test_budget_is_length_minus_300(task, length):
    budget = babilong_module.parse_length(length) - 300
    pool = filler_sentences("books")
    for p in babilong(task, length, n=4, seed=3):
        body = p.prompt.split("<context> \n", 1)[1].rsplit("\n</context>", 1)[0]
        context = len(pretokenize(body))
        last_filler = pool[book_filler(p)[-1]]
        assert budget <= context < budget + len(pretokenize(last_filler))
        assert p.meta["n_tokens"] == count_tokens(p.prompt)
        assert p.meta["length"] == budget + 300


def test_facts_over_budget_get_no_filler():
    long_story = max(range(50), key=lambda i: len(babi("qa3")[i].facts))
    p = babilong("qa3", 400, indices=[long_story])[0]  # 100 tokens of budget, a long qa3 story
    assert p.meta["n_filler"] == 0 and p.prompt == babilong("qa3", "0k", indices=[long_story])[0].prompt


def test_zero_length_has_no_filler_and_reads_no_book():
    books_module._book_sentences.cache_clear()
    p = babilong("qa1", "0k", n=2)
    assert books_module._book_sentences.cache_info().currsize == 0
    assert p[0].meta["n_filler"] == 0 and p[0].meta["filler"] is None
    assert p[0].prompt == ("<context> \nJohn travelled to the hallway. Mary journeyed to the bathroom.\n"
                           "</context>\n\nQuestion: Where is John? Answer:")


def test_fact_placement_seeded_and_varied():
    a = babilong("qa2", "2k", n=6, seed=0)
    assert a == babilong("qa2", "2k", n=6, seed=0)
    assert babilong("qa2", "2k", indices=[4], seed=0)[0] == a[4]  # per question, not per call
    b = babilong("qa2", "2k", n=6, seed=1)
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    first_slots = {p.meta["fact_positions"][0] for p in a}
    assert len(first_slots) > 1  # facts are not always at the start


def test_babi_filler_still_available():
    p = babilong("qa1", "1k", n=1, filler="babi")[0]
    assert p.meta["filler"] == "babi:qa4"
    filler = [x for i, x in enumerate(context_sentences(p.prompt)) if i not in set(p.meta["fact_positions"])]
    assert filler and all(re.fullmatch(r"The [a-z]+ is (north|south|east|west) of the [a-z]+\.", x) for x in filler)
    assert babilong("qa4", "1k", n=1, filler="babi")[0].meta["filler"] == "babi:qa1"


@pytest.mark.parametrize("length", ["9999k", "129k", MAX_LENGTH + 1, "131073"])
def test_absurd_lengths_refused_before_building(length, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("built something")

    monkeypatch.setattr(babilong_module, "babi", boom)
    monkeypatch.setattr(babilong_module, "filler_sentences", boom)
    start = time.perf_counter()
    msg = one_line_error(babilong, "qa1", length, match=r"above the maximum 128k \(131,072 tokens\)")
    assert time.perf_counter() - start < 0.1 and str(length) in msg
    with pytest.raises(DiffMambaError, match="above the maximum 128k"):
        load_data(f"babilong:qa1:{length}", n=1)


@pytest.mark.parametrize("length", ["1.5k", "-1k", "k", "", "1m", "12 k", "0k,1k", 2.5, True, -3, None])
def test_malformed_lengths(length):
    one_line_error(babilong, "qa1", length, match=r"bad BABILong length")


def test_128k_is_fast_memory_bounded_and_counts_each_sentence_once():
    filler_sentences("books")  # load the books outside the measurement
    tracemalloc.start()
    start = time.perf_counter()
    [p] = babilong("qa1", "128k", n=1)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 10 and peak < 60_000_000
    assert MAX_LENGTH - 300 <= p.meta["n_tokens"] < MAX_LENGTH - 300 + 200

    class CountingTokenizer:  # whitespace tokens; records how much text it is asked to encode
        def __init__(self):
            self.chars = self.calls = 0

        def encode(self, text, add_special_tokens=False):
            self.chars += len(text)
            self.calls += 1
            return text.split()

    tok = CountingTokenizer()
    [q] = babilong("qa2", "64k", n=1, tokenizer=tok)
    assert q.meta["n_tokens"] == len(q.prompt.split())
    idx = book_filler(q, count=lambda x: len((" " + x).split()))
    considered = idx[-1] - idx[0] + 1  # the run of book sentences looked at, short ones included
    assert idx[-1] > idx[0] and len(idx) == q.meta["n_filler"]
    # each distinct sentence counted once (facts, the book run), plus the finished prompt
    assert tok.calls <= len(set(q.meta["facts"])) + considered + 1
    assert tok.chars < 2.1 * len(q.prompt)


# ---------------------------------------------------------------- 4. several lengths


def test_several_lengths_in_one_spec():
    spec = parse_data_spec("babilong:qa1:0k,1k,2k,4k")
    assert spec == DataSpec("babilong", task="qa1", split="test", length=(0, 1024, 2048, 4096))
    assert spec.lengths == (0, 1024, 2048, 4096) and str(spec) == "babilong:qa1:0k,1k,2k,4k:test"
    assert parse_data_spec("babilong:qa1:1k").lengths == (1024,)
    assert parse_lengths("0k, 300") == (0, 300) and parse_lengths(["1k", 0]) == (1024, 0)
    prompts = load_data("babilong:qa1:0k,1k,2k,4k", n=3, seed=2)
    assert [p.meta["length"] for p in prompts] == [0] * 3 + [1024] * 3 + [2048] * 3 + [4096] * 3
    indices = [p.meta["index"] for p in prompts]
    assert indices[0:3] == indices[3:6] == indices[6:9] == indices[9:12]  # the same questions at each length
    assert [p.answer for p in prompts[:3]] == [p.answer for p in prompts[9:]]
    assert all(p.meta["n_tokens"] >= 4096 - 300 for p in prompts[9:])
    for spec, match in [("babilong:qa1:0k,,1k", "empty entry"), ("babilong:qa1:1k,1k", "given twice"),
                        ("babilong:qa1:0k,200k", r"above the maximum.*babilong:qa1:0k,200k"),
                        ("babilong:qa1:0k,x", r"bad BABILong length 'x'")]:
        one_line_error(load_data, spec, match=match)


# ---------------------------------------------------------------- 5. sampling


def test_load_data_samples_with_the_seed():
    expected = list(range(1000))
    random.Random("load_data:7:qa1:test").shuffle(expected)  # the documented recipe
    picked = load_data("babi:qa1", n=5, seed=7)
    assert [p.meta["index"] for p in picked] == expected[:5]
    assert picked == load_data("babi:qa1", n=10, seed=7)[:5] == load_data("babi:qa1", n=5, seed=7)
    assert [p.meta["index"] for p in load_data("babi:qa1", n=5, seed=8)] != expected[:5]
    assert [p.meta["index"] for p in load_data("babi:qa1")] == list(range(1000))
    assert sorted(p.meta["index"] for p in load_data("babi:qa1", n=1000, seed=7)) == list(range(1000))


def test_jsonl_sampling(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}", "answer": "a{i}"}}\n' for i in range(6)))
    assert [p.prompt for p in load_data(f"jsonl:{path}")] == [f"p{i}" for i in range(6)]
    order = list(range(6))
    random.Random(f"load_data:1:jsonl:{path}").shuffle(order)
    assert [p.prompt for p in load_data(f"jsonl:{path}", n=3, seed=1)] == [f"p{i}" for i in order[:3]]
    one_line_error(load_data, f"jsonl:{path}", n=7, match=rf"n=7 but jsonl:{re.escape(str(path))} has 6 examples")


@pytest.mark.parametrize("n", [2.5, True, False, -1, 0, "3", 1.0])
def test_n_of_the_wrong_type_or_sign(n):
    one_line_error(load_data, "babi:qa1", n=n, match=rf"n must be a positive whole number of examples, got {re.escape(repr(n))}")


def test_n_above_the_examples():
    one_line_error(load_data, "babi:qa1", n=5000, match=r"^n=5000 but babi:qa1:test has 1000 examples$")
    one_line_error(load_data, "babilong:qa2:1k,2k", n=1001,
                   match=r"^n=1001 but babilong:qa2:1k,2k:test has 1000 examples$")
    one_line_error(load_data, "paper", n=2001, match=r"^n=2001 but paper has 2000 examples$")
    assert len(load_data("babi:qa5:train", n=10_000)) == 10_000


# ---------------------------------------------------------------- 6. the paper preset


def test_paper_selection_is_the_last_100_upstream_rows():
    prompts = paper_prompts()
    assert len(prompts) == 2000
    by_task = {}
    for p in prompts:
        by_task.setdefault(p.task, []).append(p.meta["index"])
    assert sorted(by_task, key=lambda t: int(t[2:])) == ALL_TASKS
    for task, idx in by_task.items():
        end = 1000 if task in ("qa1", "qa6", "qa7", "qa8", "qa9", "qa10") else 999
        assert sorted(idx) == list(range(end - 100, end)), task


# (target, question) of the first three and last two rows of upstream's own 0k evaluation CSVs
# (NadavSc/Diff-Mamba retrieval/babilong/scripts/babilong_evals/diffmamba2-370m-needle-finetune-seed0/
# qa{1..5}_0k_*.csv): the last 100 rows of RMT-team/babilong-1k-samples 0k, in order.
UPSTREAM_CSV_ROWS = {
    "qa1": ([("bathroom", "Where is Daniel? "), ("bathroom", "Where is Daniel? "), ("garden", "Where is John? ")],
            [("bathroom", "Where is Sandra? "), ("bedroom", "Where is John? ")]),
    "qa2": ([("garden", "Where is the milk? "), ("bedroom", "Where is the milk? "), ("bedroom", "Where is the milk? ")],
            [("hallway", "Where is the apple? "), ("hallway", "Where is the football? ")]),
    "qa3": ([("bedroom", "Where was the milk before the garden? "), ("office", "Where was the milk before the bedroom? "),
             ("office", "Where was the milk before the bedroom? ")],
            [("bedroom", "Where was the milk before the kitchen? "),
             ("bathroom", "Where was the football before the garden? ")]),
    "qa4": ([("hallway", "What is west of the office?"), ("bedroom", "What is the office north of?"),
             ("hallway", "What is west of the kitchen?")],
            [("kitchen", "What is west of the bedroom?"), ("kitchen", "What is north of the bedroom?")]),
    "qa5": ([("Bill", "Who gave the football? "), ("Jeff", "Who received the apple? "),
             ("apple", "What did Fred give to Jeff? ")],
            [("football", "What did Mary give to Bill? "), ("football", "What did Mary give to Bill? ")]),
}


@pytest.mark.parametrize("task", sorted(UPSTREAM_CSV_ROWS))
def test_paper_rows_match_upstream_eval_csv(task):
    rows = [(s.answer, s.raw_question) for s in (babi(task)[i] for i in paper_module.upstream_rows(task))]
    head, tail = UPSTREAM_CSV_ROWS[task]
    assert rows[:3] == head and rows[-2:] == tail


def test_paper_order_and_first_items_hand_built():
    prompts = paper_prompts()
    # numpy.random.default_rng(42).permutation(2000) starts 1631, 285, 1268: row 1631 = qa17 row 31
    # of its last 100 = test question 899 + 31 = 930 (qa17 has 999 upstream rows); 285 = qa3 question
    # 899 + 85 = 984; 1268 = qa13 question 899 + 68 = 967
    assert [(p.task, p.meta["index"]) for p in prompts[:3]] == [("qa17", 930), ("qa3", 984), ("qa13", 967)]
    # qa17 test file lines 1156-1157, 1165 (question 931 of the file)
    assert prompts[0].prompt == (
        "<context> \nThe yellow square is to the right of the pink rectangle. The red sphere is below the yellow "
        "square.\n</context>\n\nQuestion: Is the pink rectangle below the red sphere? Answer:")
    assert (prompts[0].answer, prompts[0].target) == ("no", " no")
    # qa13 lines 2896-2904: the question keeps the file's trailing space (two spaces before Answer)
    assert prompts[2].prompt == (
        "<context> \nJohn and Sandra went back to the bathroom. Afterwards they went to the office. Sandra and "
        "Mary moved to the hallway. Following that they moved to the kitchen. John and Daniel travelled to the "
        "kitchen. Following that they journeyed to the garden.\n</context>\n\nQuestion: Where is John?  Answer:")
    assert prompts[2].answer == "garden" and prompts[2].meta["line"] == 2904
    assert prompts[1].prompt.endswith("Question: Where was the football before the garden?  Answer:")
    assert prompts[1].answer == "hallway"
    assert [p.meta["position"] for p in prompts[:3]] == [0, 1, 2]


def test_paper_order_is_numpy_default_rng_permutation():
    np = pytest.importorskip("numpy")
    prompts = paper_prompts()
    order = np.random.default_rng(42).permutation(2000).tolist()
    assert order[:3] == [1631, 285, 1268]
    unshuffled = [(t, i) for t in ALL_TASKS for i in paper_module.upstream_rows(t)]
    assert [(p.task, p.meta["index"]) for p in prompts] == [unshuffled[j] for j in order]


def test_paper_order_equals_hf_datasets_shuffle():
    datasets = pytest.importorskip("datasets")
    shuffled = datasets.Dataset.from_dict({"row": list(range(2000))}).shuffle(seed=42)["row"]
    unshuffled = [(t, i) for t in ALL_TASKS for i in paper_module.upstream_rows(t)]
    assert [(p.task, p.meta["index"]) for p in paper_prompts()] == [unshuffled[j] for j in shuffled]


def test_paper_spec_and_options():
    prompts = paper_prompts()
    assert load_data("paper") == prompts
    assert load_data("paper", n=200) == load_data("babilong-paper", n=200, seed=5) == prompts[:200]
    assert parse_data_spec(" paper ") == DataSpec("paper") and str(DataSpec("paper")) == "paper"
    one_line_error(parse_data_spec, "paper:qa1", match="takes no arguments")
    small = paper_prompts(tasks=["qa2", "qa1"], per_task=3, seed=0)
    assert sorted((p.task, p.meta["index"]) for p in small) == [
        ("qa1", 997), ("qa1", 998), ("qa1", 999), ("qa2", 996), ("qa2", 997), ("qa2", 998)]
    one_line_error(paper_prompts, per_task=0, match="per_task must be")
    one_line_error(paper_prompts, tasks=["qa1", "qa1"], match="given twice")
    one_line_error(paper_prompts, tasks=["qa21"], match="unknown bAbI task 'qa21'")


def test_paper_questions_keep_the_files_spacing():
    for p in paper_prompts():
        raw = babi(p.task)[p.meta["index"]].raw_question
        assert p.prompt.endswith(f"Question: {raw} Answer:")
        assert p.prompt.startswith("<context> \n") and p.meta["length"] == 0
    assert babi("qa1")[0].raw_question == "Where is John? " and babi("qa4")[0].raw_question.endswith("?")


# ---------------------------------------------------------------- 7. story ids


def test_story_ids_shared_within_a_story():
    prompts = babilong("qa1", n=10)
    assert [p.meta["story"] for p in prompts] == ["qa1:test:0"] * 5 + ["qa1:test:1"] * 5
    assert [p.meta["story_id"] for p in prompts[:6]] == [0, 0, 0, 0, 0, 1]
    long = load_data("babilong:qa3:1k,2k", n=4, seed=1)
    assert all(p.meta["story"] == f"qa3:test:{babi('qa3')[p.meta['index']].story_id}" for p in long)
    stories = {}
    for p in paper_prompts():
        stories.setdefault(p.meta["story"], set()).add(p.task)
        assert p.meta["story"] == f"{p.task}:test:{babi(p.task)[p.meta['index']].story_id}"
    assert all(len(tasks) == 1 for tasks in stories.values())
    assert 150 < len(stories) < 2000  # several questions share a story


def test_jsonl_story(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b", "story": "s1"}\n{"prompt": "c", "answer": "d"}\n')
    rows = load_data(f"jsonl:{path}")
    assert [p.meta["story"] for p in rows] == ["s1", "jsonl:2"]


# ---------------------------------------------------------------- 8. bad input, one line each


def test_latin1_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "a", "answer": "b"}\n{"prompt": "café", "answer": "b"}\n'.encode("latin-1"))
    msg = one_line_error(load_data, f"jsonl:{path}", match=rf"{re.escape(str(path))} line 2: not UTF-8 \(byte 0xe9")
    assert "UTF-8" in msg
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "b"}\n')
    assert load_data(f"jsonl:{bom}")[0].prompt == "a"


def test_latin1_babi_and_filler_files_name_the_line(tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "qa1_single-supporting-fact_test.txt").write_bytes(
        "1 John went to the hallway.\n2 Jos\xe9 went home.\n3 Where is John? \thallway\t1\n".encode("latin-1"))
    one_line_error(babi, "qa1", data_dir=tmp_path, match=r"qa1_single-supporting-fact_test.txt:2: not UTF-8")
    book = tmp_path / "book.txt"
    book.write_bytes("A line.\nAnother caf\xe9.\n".encode("latin-1"))
    one_line_error(babilong, "qa1", "1k", filler=book, match=r"book.txt line 2: not UTF-8")


@pytest.mark.parametrize("spec, match", [
    ("babi:qa21", r"unknown bAbI task 'qa21'"),
    ("babilong:foo:1k", r"unknown bAbI task 'foo'"),
    ("babi:qa0", r"unknown bAbI task 'qa0'"),
    ("babi:qa9:train", r"no train file for bAbI qa9 shipped \(available splits: test\); pass data_dir="),
    ("babilong:qa12:1k:train", r"no train file for bAbI qa12 shipped"),
    ("babilong:qa1:1.5k", r"bad BABILong length '1.5k'.*data spec 'babilong:qa1:1.5k'"),
    ("babilong:qa1:9999k", r"'9999k' is 10,238,976 tokens, above the maximum 128k"),
    ("paper:x", r"takes no arguments"),
])
def test_bad_specs_one_line(spec, match):
    one_line_error(load_data, spec, match=match)


def test_bad_arguments_one_line(tmp_path):
    one_line_error(babilong, "qa1", "1k", filler=3, match="bad filler 3")
    one_line_error(babilong, "qa1", n=2.5, match="n must be a whole number >= 0")
    one_line_error(babilong, "qa1", n=True, match="n must be")
    one_line_error(babilong, "qa1", indices=[1000], match=r"question index 1000 out of range for bAbI qa1 test")
    one_line_error(babilong, "qa1", seed="1", match="seed must be a whole number")
    one_line_error(load_data, "babi:qa1", n=1, seed=1.5, match="seed must be a whole number")
    one_line_error(load_data, 42, match="data spec must be a string")


# ---------------------------------------------------------------- 9. training_stream and exports


def test_training_stream_unchanged():
    pairs = list(training_stream())
    assert len(pairs) == 10_000 + 10_000 + 1000 + 10_000 + 10_000
    first = babi("qa1", "train")[0]
    assert pairs[0] == (f"<context> \n{' '.join(first.facts)}\n</context>\n\nQuestion: {first.question} Answer:",
                        first.answer)


def test_public_names_exported():
    old = {"DATA_DIR", "BabiSample", "Prompt", "DataSpec", "TEMPLATE", "babi", "babilong", "available_tasks",
           "format_prompt", "count_tokens", "training_stream", "parse_data_spec", "load_data",
           "build_babi_tokenizer", "pretokenize"}
    new = {"FILLER_DIR", "MAX_LENGTH", "filler_sentences", "split_sentences", "paper_prompts", "parse_lengths"}
    assert old | new <= set(data_pkg.__all__)
    assert all(hasattr(data_pkg, name) for name in data_pkg.__all__)
