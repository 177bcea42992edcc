"""Preparing analysis inputs, shared by every analysis that reads prompts: prompts to token ids, the
target token of an answer (the first token of " " + answer), right-padded batches, and accepting
`Prompt`-like objects (with .prompt, .answer, .candidates) in place of separate lists.

The tokenizer guard lives here, for every model and tokenizer (`unknown_token`): an answer, candidate
or other word whose tokens include the unknown token is a one-line DiffMambaError naming the word
(`first_token`, `check_vocabulary`), raised before any forward pass; prompts with unknown tokens get
one `UnknownTokenWarning` with the count (`encode_prompts`, `warn_unknown`), not one per prompt.
Tokenizers that cannot produce an unknown token (byte-level BPE: no unk token, or one that is also
the eos/bos token, as GPT-2's and GPT-NeoX's ``<|endoftext|>``) never trip it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import DiffMambaError

__all__ = ["first_token", "prompt_ids", "padded_batches", "unpad", "unpack_prompts", "story_ids", "check_log_probs",
           "UnknownTokenWarning", "unknown_token", "check_vocabulary", "encode_prompts", "warn_unknown",
           "unknown_tokens_once"]


class UnknownTokenWarning(UserWarning):
    """Prompts hold words outside the tokenizer's vocabulary: the model reads them as the unknown token."""


def unknown_token(tokenizer) -> tuple[int, str] | None:
    """(id, text) of the tokenizer's unknown token, or None when text cannot produce one: no tokenizer,
    no unk token (byte-level BPE), or an unk token that is also the eos or bos token (GPT-2 and
    GPT-NeoX name ``<|endoftext|>`` as their unk token, which only that literal text encodes to)."""
    if tokenizer is None:
        return None
    unk, unk_id = getattr(tokenizer, "unk_token", None), getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk_id is None or isinstance(unk_id, bool) or not isinstance(unk_id, (int, np.integer)):
        return None
    if str(unk) in {str(getattr(tokenizer, "eos_token", None)), str(getattr(tokenizer, "bos_token", None))}:
        return None
    return int(unk_id), str(unk)


def _unknown_words(text: str, ids: Sequence[int], tokenizer, unk: tuple[int, str],
                   name: bool = True) -> tuple[int, str | None]:
    """How many of `ids` (the encoding of `text`) are the unknown token, not counting a literal unk
    token typed in the text, and (with `name`) the first such word, from the offsets where the
    tokenizer gives them."""
    count = sum(1 for i in ids if i == unk[0]) - text.count(unk[1])
    if count <= 0 or not name:
        return max(count, 0), None
    word = None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if i == unk[0] and text[a:b] != unk[1]:
                word = text[a:b]
                break
    except Exception:  # noqa: BLE001 - a tokenizer without offsets: the count alone
        pass
    return count, word


def check_vocabulary(word: str, tokenizer, what: str = "answer", ids: Sequence[int] | None = None) -> list[int]:
    """The token ids of " " + word, or a one-line DiffMambaError naming the word when any of them is
    the tokenizer's unknown token (it would be scored as `<unk>`, whatever the word). `ids`: its
    encoding when already known. A word that is the unk token's own text is let through."""
    if ids is None:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
    unk = unknown_token(tokenizer)
    if unk is not None and unk[0] in ids and word.strip() != unk[1]:
        _, part = _unknown_words(" " + word, ids, tokenizer, unk)
        subject = f"its part {part.strip()!r}" if part and part.strip() != word.strip() else "it"
        scored = ", which would be scored in its place" if ids[0] == unk[0] else ""
        raise DiffMambaError(f"{what} {word!r} is not in the tokenizer's vocabulary: {subject} encodes to the unknown "
                             f"token {unk[1]!r} (as every word outside the vocabulary does){scored}")
    return list(ids)


def warn_unknown(texts: Sequence, seqs: Sequence[Sequence[int]], tokenizer, stacklevel: int = 2,
                 seen: set | None = None) -> int:
    """One `UnknownTokenWarning` for a set of prompts (texts and their token ids) whose encoding holds
    the unknown token, with the count of such tokens and prompts and the first word; returns the count
    (0: no warning). Prompts given as token ids are not counted. seen: messages already given (say,
    for another model with the same tokenizer) are not repeated; the new one is added."""
    unk = unknown_token(tokenizer)
    if unk is None:
        return 0
    total, hit, example = 0, 0, None
    for text, ids in zip(texts, seqs):
        if not isinstance(text, str) or unk[0] not in ids:
            continue
        k, word = _unknown_words(text, ids, tokenizer, unk, name=example is None)
        if k > 0:
            total, hit = total + k, hit + 1
            example = example or word
    if total:
        eg = f" (e.g. {example!r})" if example else ""
        message = (f"{total} unknown token{'s' if total > 1 else ''} in {hit} of {len(seqs)} prompt"
                   f"{'s' if len(seqs) > 1 else ''}: words outside the tokenizer's vocabulary{eg} are read as {unk[1]!r}")
        if seen is None or message not in seen:
            warnings.warn(message, UnknownTokenWarning, stacklevel=stacklevel + 1)
        if seen is not None:
            seen.add(message)
    return total


@contextmanager
def unknown_tokens_once():
    """Within it (a `with` block, or a decorator on a job that runs several analyses over the same
    prompts), only the first `UnknownTokenWarning` is shown; later ones, whatever their counts, are
    dropped. Other warnings pass as they are."""
    with warnings.catch_warnings():
        show, shown = warnings.showwarning, []

        def once(message, category, *args, **kwargs):
            if isinstance(category, type) and issubclass(category, UnknownTokenWarning):
                if shown:
                    return
                shown.append(message)
            show(message, category, *args, **kwargs)

        warnings.showwarning = once
        yield


def encode_prompts(prompts: Sequence, tokenizer, stacklevel: int = 2, seen: set | None = None) -> list[list[int]]:
    """`prompt_ids` of every prompt, then one `warn_unknown` warning for all of them (not one per prompt;
    `seen` as there)."""
    seqs = [prompt_ids(p, tokenizer) for p in prompts]
    warn_unknown(prompts, seqs, tokenizer, stacklevel=stacklevel + 1, seen=seen)
    return seqs


def _is_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def first_token(text_or_id, tokenizer, what: str = "answer") -> tuple[int, int, str]:
    """First token of " " + text -> (token id, number of tokens, the text); an int is taken as a token id.

    DiffMambaError (one line) for a negative token id, a text with a token that is the tokenizer's
    unknown token (`check_vocabulary`: a word outside the vocabulary would be scored as `<unk>`), and
    anything that is neither a string nor a token id.
    """
    if isinstance(text_or_id, torch.Tensor) and text_or_id.numel() == 1 and not text_or_id.is_floating_point() \
            and text_or_id.dtype != torch.bool:
        text_or_id = int(text_or_id.item())
    if _is_id(text_or_id):
        tid = int(text_or_id)
        if tid < 0:
            raise DiffMambaError(f"{what} token id {tid} is negative; token ids are 0..vocab_size-1")
        label = str(tid)
        if tokenizer is not None:
            try:
                label = tokenizer.decode([tid])
            except Exception:  # noqa: BLE001 - an id beyond the tokenizer (a padded vocabulary): keep the number
                label = str(tid)
        return tid, 1, label
    if not isinstance(text_or_id, str):
        raise DiffMambaError(f"{what} must be a string or a token id, got {type(text_or_id).__name__}")
    if tokenizer is None:
        raise DiffMambaError(f"{what} {text_or_id!r} is text but there is no tokenizer; pass tokenizer= or token ids")
    ids = tokenizer.encode(" " + text_or_id, add_special_tokens=False)
    if not ids:
        raise DiffMambaError(f"{what} {text_or_id!r} produces no tokens (first token of ' ' + {what} is the target)")
    check_vocabulary(text_or_id, tokenizer, what, ids)
    return int(ids[0]), len(ids), text_or_id


def prompt_ids(prompt, tokenizer) -> list[int]:
    """A prompt (text, a 1-D integer tensor or a sequence of token ids) -> its token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise DiffMambaError("prompts are text but there is no tokenizer; pass tokenizer= or token ids")
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise DiffMambaError(f"a prompt of token ids must be an integer tensor, got dtype {prompt.dtype}")
        ids = prompt.flatten().tolist()
    else:
        try:
            ids = list(prompt)
        except TypeError:
            raise DiffMambaError(f"a prompt must be a text or a sequence of token ids, got {type(prompt).__name__}") from None
        bad = next((i for i in ids if not _is_id(i)), None)
        if bad is not None or any(i is None for i in ids):
            raise DiffMambaError(f"a prompt of token ids must hold whole numbers, got {bad!r} ({type(bad).__name__})")
        ids = [int(i) for i in ids]
    if not ids:
        raise DiffMambaError(f"prompt {str(prompt)[:60]!r} produces no tokens")
    neg = next((i for i in ids if i < 0), None)
    if neg is not None:
        raise DiffMambaError(f"a prompt holds the token id {neg}; token ids are 0..vocab_size-1")
    return ids


def _as_list(value, what: str, per: str = "one per prompt") -> list:
    """A list from a list-like argument; a single string (or any non-iterable) is a one-line error,
    since `list("kitchen")` would silently give seven one-letter answers."""
    if isinstance(value, str):
        raise DiffMambaError(f"{what} must be a list ({per}), got the string {value[:60]!r}; wrap it in a list")
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist() if value.ndim <= 1 else list(value)
    if isinstance(value, dict) or not hasattr(value, "__iter__"):
        raise DiffMambaError(f"{what} must be a list ({per}), got {type(value).__name__}")
    return list(value)


def unpack_prompts(prompts, answers, candidates):
    """Accept `Prompt`-like objects (with .prompt, .answer, .candidates) when answers is None.

    Checks the shapes: prompts, answers and candidates are lists of one item per prompt (a single
    string where a list belongs is an error), each candidates item a list of answers."""
    if isinstance(prompts, torch.Tensor) and prompts.ndim == 2:
        prompts = list(prompts)
    prompts = _as_list(prompts, "prompts", "of texts, token-id sequences or Prompt objects")
    if answers is None:
        if not all(hasattr(p, "prompt") and hasattr(p, "answer") for p in prompts):
            raise DiffMambaError("answers is missing: pass answers=, or Prompt objects that carry .answer")
        answers = [p.answer for p in prompts]
        if candidates is None:
            candidates = [list(getattr(p, "candidates", ()) or ()) for p in prompts]
        prompts = [p.prompt for p in prompts]
    answers = _as_list(answers, "answers")
    if len(answers) != len(prompts):
        raise DiffMambaError(f"{len(prompts)} prompts but {len(answers)} answers")
    if candidates is not None:
        lists = _as_list(candidates, "candidates", "one list of other answers per prompt")
        candidates = [[] if c is None else _as_list(c, f"candidates[{i}]", f"the other answers of prompt {i}")
                      for i, c in enumerate(lists)]
        if len(candidates) != len(prompts):
            raise DiffMambaError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    return prompts, answers, candidates


def story_ids(prompts) -> list | None:
    """The story (cluster) of each prompt, from `Prompt.meta["story"]`: questions of one bAbI story are
    not independent, so the bootstrap resamples stories. None when the prompts carry no story ids."""
    ids = [getattr(p, "meta", {}).get("story") if isinstance(getattr(p, "meta", None), dict) else None for p in prompts]
    return ids if ids and all(i is not None for i in ids) else None


def unpad(input_ids, lengths) -> list[list[int]]:
    """A right-padded batch [B, L] and each row's real length -> the rows without their padding
    (`model.to_tokens(texts, return_lengths=True)` gives both). A one-line DiffMambaError for lengths
    that are not one whole number in 1..L per row."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise DiffMambaError("lengths= goes with a right-padded LongTensor [batch, pos] of token ids")
    B, L = input_ids.shape
    n = torch.as_tensor(lengths).flatten()
    if n.is_floating_point() or n.dtype == torch.bool or len(n) != B or int(n.min()) < 1 or int(n.max()) > L:
        raise DiffMambaError(f"lengths must give one length in 1..{L} per row ({B} rows), got {n.tolist()}")
    return [row[:k] for row, k in zip(input_ids.tolist(), n.tolist())]


def padded_batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0):
    """Right-padded batches of prompts of any lengths: indices sorted by length (stable) in chunks of at
    most batch_size -> (indices, ids [b, max length] right-padded with pad_id, last position of each
    row). Exact for a causal model read at each row's own last token; sorting keeps padding small."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DiffMambaError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        L = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
        yield idx, ids, [len(seqs[i]) - 1 for i in idx]


def check_log_probs(lp: torch.Tensor, model=None) -> torch.Tensor:
    """Raise a one-line DiffMambaError when log-probabilities hold NaN (a model with non-finite
    weights or activations): a probability, an SNR or a rank (counted with `>`, which is False
    against NaN, so NaN would rank first) computed from them would be silently wrong."""
    if bool(torch.isnan(lp).any()):
        where = getattr(model, "checkpoint_path", None) or getattr(getattr(model, "cfg", None), "arch", "the model")
        raise DiffMambaError(
            f"{where}: the lens log-probabilities are NaN (non-finite weights or activations); "
            "no probability, SNR or rank can be computed"
        )
    return lp
