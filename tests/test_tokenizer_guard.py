"""The tokenizer guard of every analysis (`analysis.inputs`): an answer or candidate that encodes to the
unknown token is a one-line error naming the word, before any forward pass; prompts with unknown tokens
give ONE warning with the count; tokenizers that cannot produce an unknown token (byte-level BPE)
never trip it."""

import warnings

import pytest
import torch
from typer.testing import CliRunner

from helpers import one_line_error
from diffmamba_interp import accuracy_by_length, target_probs
from diffmamba_interp.analysis.inputs import (
    UnknownTokenWarning, check_vocabulary, encode_prompts, first_token, unknown_token, unknown_tokens_once,
    warn_unknown,
)
from diffmamba_interp.analysis.branch_lens import branch_lens
from diffmamba_interp.analysis.compare import compare
from diffmamba_interp.cli import app
from diffmamba_interp.data.babilong import Prompt
from diffmamba_interp.errors import DiffMambaError

KNOWN = "<context> \nMary went to the kitchen. John moved to the garden.\n</context>\n\nQuestion: Where is Mary? Answer:"
ONE_UNKNOWN = KNOWN.replace("kitchen.", "kitchenette.")  # 1 unknown word
TWO_UNKNOWN = KNOWN.replace("John moved", "Zorg blorped")  # 2 unknown words
PROMPTS = [ONE_UNKNOWN, KNOWN, TWO_UNKNOWN]


def caught(fn, *args, **kwargs):
    """(result, the UnknownTokenWarnings fn gave)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [w for w in got if issubclass(w.category, UnknownTokenWarning)]


@pytest.fixture
def model(tiny_model, tokenizer):
    m = tiny_model("diffmamba2", vocab_size=len(tokenizer), shared=True)
    m.tokenizer = tokenizer
    return m


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2 style: every text encodes, there is no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([KNOWN] * 10, trainer)
    return t


# -- answers and candidates ------------------------------------------------------------------------
def test_an_unknown_answer_or_candidate_is_an_error_naming_the_word(model, tokenizer):
    msg = one_line_error(first_token, "kitchenette", tokenizer)
    assert msg.startswith("answer 'kitchenette' is not in the tokenizer's vocabulary") and "'<unk>'" in msg
    msg = one_line_error(first_token, "garden zzyzx", tokenizer, what="candidate")  # its second word only
    assert "candidate 'garden zzyzx'" in msg and "its part 'zzyzx'" in msg
    assert check_vocabulary("kitchen", tokenizer) == tokenizer.encode(" kitchen", add_special_tokens=False)
    assert first_token("<unk>", tokenizer)[0] == tokenizer.unk_token_id  # the unk token's own text is not refused
    # every analysis that reads answers, before any forward pass
    for fn, args, kwargs, needle in [
        (target_probs, (model, [KNOWN], ["kitchenette"]), {}, "answer 'kitchenette'"),
        (target_probs, (model, [KNOWN], ["kitchen"]), {"candidates": [["garden", "zzyzx"]]}, "candidate 'zzyzx'"),
        (branch_lens, (model, [KNOWN], ["kitchenette"]), {}, "target 'kitchenette'"),
        (accuracy_by_length, ([model], [Prompt(KNOWN, "kitchenette", ("garden",), "qa1")]), {}, "answer 'kitchenette'"),
        (accuracy_by_length, ([model], [Prompt(KNOWN, "kitchen", ("zzyzx",), "qa1")]), {}, "candidate 'zzyzx'"),
    ]:
        msg = one_line_error(fn, *args, progress=False, **kwargs)
        assert needle in msg and "is not in the tokenizer's vocabulary" in msg and "\n" not in msg, msg


def test_the_guard_runs_before_any_forward_pass(model, tokenizer, monkeypatch):
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("a forward pass ran before the guard"))
    with pytest.raises(DiffMambaError, match="'zzyzx' is not in"):
        accuracy_by_length([model], [Prompt(KNOWN, "kitchen", ()), Prompt(KNOWN, "zzyzx", ())], progress=False)
    with pytest.raises(DiffMambaError, match="'zzyzx' is not in"):
        target_probs(model, [KNOWN, KNOWN], ["kitchen", "zzyzx"], progress=False)


# -- prompts ---------------------------------------------------------------------------------------
def test_prompts_with_unknown_tokens_warn_once_with_the_count(model, tokenizer):
    seqs, got = caught(encode_prompts, PROMPTS, tokenizer)
    assert [s.count(tokenizer.unk_token_id) for s in seqs] == [1, 0, 2]
    assert len(got) == 1 and str(got[0].message).startswith("3 unknown tokens in 2 of 3 prompts")
    assert "'kitchenette'" in str(got[0].message) and "\n" not in str(got[0].message)
    # one warning per analysis (not one per prompt), for every entry point
    for fn, args, kwargs in [(target_probs, (model, PROMPTS, ["Mary"] * 3), {"progress": False}),
                             (branch_lens, (model, PROMPTS, ["Mary"] * 3), {"progress": False}),
                             (model.to_tokens, (PROMPTS,), {})]:
        _, got = caught(fn, *args, **kwargs)
        assert len(got) == 1 and "3 unknown tokens in 2 of 3 prompts" in str(got[0].message), fn
    # several models on the same prompts: one warning, not one per model
    _, got = caught(compare, [model, model], PROMPTS, ["Mary"] * 3, labels=["a", "b"], n_boot=10, progress=False)
    assert len(got) == 1
    prompts = [Prompt(p, "Mary", (), "qa1") for p in PROMPTS]
    _, got = caught(accuracy_by_length, [model, model], prompts, labels=["a", "b"], max_new_tokens=2, progress=False)
    assert len(got) == 1 and "3 unknown tokens in 2 of 3 prompts" in str(got[0].message)
    # prompts whose words are all known, and the unk token typed as text, give none
    _, got = caught(encode_prompts, [KNOWN, KNOWN.replace("John", "<unk>")], tokenizer)
    assert got == []


def test_unknown_tokens_once_keeps_the_first_and_other_warnings():
    def job():
        warnings.warn("5 unknown tokens in 2 of 9 prompts", UnknownTokenWarning)
        warnings.warn("something else")
        warnings.warn("1 unknown token in 1 of 1 prompt", UnknownTokenWarning)

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with unknown_tokens_once():
            job()
    assert [str(w.message) for w in got] == ["5 unknown tokens in 2 of 9 prompts", "something else"]


def test_cli_prints_one_warning_line(tiny_checkpoint):
    result = CliRunner().invoke(app, ["lens", "--ckpt", str(tiny_checkpoint), "--prompt", TWO_UNKNOWN, "--answer", "kitchen"])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: 2 unknown tokens in 1 of 1 prompt: words outside the tokenizer's vocabulary (e.g. 'Zorg') "
                     "are read as '<unk>'"]
    result = CliRunner().invoke(app, ["lens", "--ckpt", str(tiny_checkpoint), "--prompt", KNOWN, "--answer", "zzyzx"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "answer 'zzyzx' is not in" in result.stderr


# -- tokenizers without an unknown token ---------------------------------------------------------------
@pytest.mark.parametrize("unk", [None, "<|endoftext|>"])  # no unk token; GPT-2's: the eos token named as unk
def test_byte_level_bpe_never_trips_the_guard(tiny_model, bpe, unk):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  **({"unk_token": unk} if unk else {}))
    assert unknown_token(tok) is None
    assert len(check_vocabulary("zzyzx", tok)) > 1  # spelled in bytes, never unknown
    model = tiny_model("mamba2", vocab_size=len(tok), shared=True)
    model.tokenizer = tok
    odd = [KNOWN.replace("Mary", "Zyxwv"), "Ünïcödé 🙂 qwzx <|endoftext|>"]
    seqs, got = caught(encode_prompts, odd, tok)
    assert got == [] and warn_unknown(odd, seqs, tok) == 0
    df, got = caught(target_probs, model, odd, ["zzyzx", "kitchenette"], candidates=[["qqq"], []], progress=False)
    assert got == [] and len(df)


def test_the_shipped_tokenizers(tokenizer):
    """Whatever the shipped models' tokenizer is: with an unk token the guard refuses a made-up word; a
    byte-level one never refuses."""
    from diffmamba_interp.jobs import models_dir
    from diffmamba_interp.loading import load_tokenizer

    found = [p for p in sorted(models_dir().glob("*")) if (p / "tokenizer.json").is_file()]
    if not found:
        pytest.skip("no shipped models")
    for path in found:
        tok = load_tokenizer(path)
        if unknown_token(tok) is None:
            assert check_vocabulary("zzyzxqv", tok)
        else:
            with pytest.raises(DiffMambaError, match="'zzyzxqv' is not in the tokenizer's vocabulary"):
                check_vocabulary("zzyzxqv", tok)
        words = ["kitchen", "garden", "Mary"]
        assert [len(check_vocabulary(w, tok)) for w in words] == [len(tok.encode(" " + w)) for w in words]
