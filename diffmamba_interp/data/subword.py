"""The subword tokenizer of the shipped models: byte-level BPE over bAbI and the shipped books.

Trained with the `tokenizers` library (GPT-2 style byte-level BPE: every text encodes, nothing is
ever unknown) on two sources, so both a bAbI story and book filler read as ordinary tokens:

* every line of the shipped bAbI files of all 20 tasks (en and en-10k, train and test: facts,
  questions and answers) and the BABILong template (`babilong.TEMPLATE`);
* the sentences of the three shipped public-domain books (`books.BOOKS`), the filler of BABILong
  prompts and the tuned lenses' training text.

Specials: ``<pad>`` (0) and ``<|endoftext|>`` (1, bos and eos); the template tags ``<context>`` and
``</context>`` are added tokens (single ids, decoded as text). Every bAbI word, with the space before
it (``" kitchen"``), is one token (`check_babi_words` asserts it), so an answer is one id, as the
answer-only loss and the SNR analysis need. Training is deterministic: two builds give the same
``tokenizer.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import DiffMambaError
from .tokenizer import babi_texts

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = ["VOCAB_SIZE", "build_subword_tokenizer", "check_babi_words"]

VOCAB_SIZE = 3072
PAD, EOS = "<pad>", "<|endoftext|>"
TAGS = ("<context>", "</context>")


def _babi_lines() -> list[str]:
    """Each distinct fact, question and answer of every shipped bAbI file (sorted: deterministic)."""
    return sorted(babi_texts())


def _corpus(babi_repeats: int = 100) -> Iterator[str]:
    """bAbI lines (repeated, so their words get whole tokens before rarer book words) and book sentences."""
    from .babilong import format_prompt
    from .books import _book_sentences

    lines = _babi_lines()
    for _ in range(babi_repeats):
        yield from (" " + line for line in lines)  # as in a prompt: facts joined by spaces
    for line in lines:  # each line once in the BABILong template, as the first fact of a prompt
        yield format_prompt([line], "Where is Mary?") + " kitchen"
    yield from _book_sentences()


def babi_words() -> tuple[str, ...]:
    """Every alphabetic word of the shipped bAbI files (sorted)."""
    return tuple(sorted({w for line in _babi_lines() for w in re.findall(r"[A-Za-z]+", line)}))


def check_babi_words(tokenizer) -> None:
    """Raise DiffMambaError unless every bAbI word, after a space, is one token of `tokenizer`."""
    words = babi_words()
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    split = [w for w, i in zip(words, ids) if len(i) != 1]
    if split:
        raise DiffMambaError(f"{len(split)} bAbI words are several tokens (e.g. {split[0]!r}); raise the vocabulary size")


def build_subword_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer (about 10 s, once per process and size) ->
    a new `transformers.PreTrainedTokenizerFast`.

    Saves with ``save_pretrained(dir)`` (tokenizer.json + tokenizer_config.json) and reloads with
    ``AutoTokenizer.from_pretrained(dir)``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 512 <= vocab_size <= 65536:
        raise DiffMambaError(f"vocab_size must be a whole number in 512..65536, got {vocab_size!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)), pad_token=PAD, eos_token=EOS, bos_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    check_babi_words(tokenizer)
    return tokenizer


@lru_cache(maxsize=2)
def _trained(vocab_size: int) -> str:
    """The trained backend tokenizer as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAGS), special_tokens=[PAD, EOS], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.add_tokens(list(TAGS))
    return backend.to_str()
