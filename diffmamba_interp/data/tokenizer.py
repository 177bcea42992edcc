"""A word-level tokenizer for the shipped bAbI tasks (qa1-qa5) and the BABILong prompt template.

Pre-tokenization (the same rule counts tokens in `babilong` when no tokenizer is given): drop runs
of whitespace other than newlines, then isolate every match of `PRETOKENIZE_PATTERN`: the template
tags ``<context>`` and ``</context>``, a newline, a run of letters, a run of digits, or any single
other non-space character (``.``, ``?``, ``,``, ``:``). So ``" kitchen"`` is the single token
``kitchen``, the same id the word has inside a prompt. Case is kept (bAbI names are capitalised;
``The`` and ``the`` are two tokens).

Vocabulary: specials ``<pad>`` (0), ``<unk>`` (1), ``<|endoftext|>`` (2, eos and bos), then every
pre-token of the shipped qa1-qa5 files (facts, questions, answers; en and en-10k) and of the
template, sorted, so two builds give identical ids (64 tokens in all). Words outside it encode to
``<unk>``. Decoding joins tokens with single spaces (no decoder is set). No special tokens are added
on encoding.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

from .babi import DATA_DIR, _QUESTION_SEP, _index

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = ["PRETOKENIZE_PATTERN", "SPECIAL_TOKENS", "TEMPLATE_TOKENS", "pretokenize", "babi_vocab",
           "build_babi_tokenizer"]

PRETOKENIZE_PATTERN = r"<context>|</context>|\n|[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]"
_PRETOKEN = re.compile(PRETOKENIZE_PATTERN)
_SPACES = r"[^\S\n]+"  # whitespace except newline

PAD, UNK, EOS = "<pad>", "<unk>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, UNK, EOS)
TEMPLATE_TOKENS = ("<context>", "</context>", "\n", "Question", "Answer", ":", ".", "?", ",")
TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")


def pretokenize(text: str) -> list[str]:
    """Split ``text`` exactly as the tokenizer's pre-tokenizer does (pure Python, no HF import)."""
    return _PRETOKEN.findall(text)


@lru_cache(maxsize=4)
def babi_texts(tasks: tuple[str, ...] | None = None) -> frozenset[str]:
    """The distinct facts, questions and answers (they repeat a lot) of every shipped file of `tasks`
    (None: all shipped tasks)."""
    texts: set[str] = set()
    for (_, task, _), path in _index(DATA_DIR).items():
        if tasks is not None and task not in tasks:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            _, _, text = line.partition(" ")  # drop the line ID
            texts.update(t for t in _QUESTION_SEP.split(text)[:2] if t)  # fact, or question and answer
    return frozenset(texts)


@lru_cache(maxsize=4)
def babi_vocab(tasks: tuple[str, ...] = TASKS) -> tuple[str, ...]:
    """Sorted pre-tokens of every shipped file of `tasks` (default qa1-qa5) plus `TEMPLATE_TOKENS` (no specials)."""
    words = set(TEMPLATE_TOKENS).union(*(pretokenize(t) for t in babi_texts(tuple(tasks))))
    return tuple(sorted(words - set(SPECIAL_TOKENS)))


def build_babi_tokenizer(tasks: tuple[str, ...] = TASKS) -> PreTrainedTokenizerFast:
    """The word-level bAbI tokenizer (over the words of `tasks`; default qa1-qa5, the shipped models')
    as a `transformers.PreTrainedTokenizerFast`.

    It saves with ``save_pretrained(dir)`` (tokenizer.json + tokenizer_config.json) and reloads with
    ``AutoTokenizer.from_pretrained(dir)`` or ``PreTrainedTokenizerFast(tokenizer_file=...)``.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *babi_vocab(tuple(tasks))))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPACES), behavior="removed"),
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
    ])
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, pad_token=PAD, eos_token=EOS, bos_token=EOS,
        clean_up_tokenization_spaces=False,
    )
