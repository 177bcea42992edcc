"""Preparing analysis inputs, shared by every analysis that reads prompts: prompts to token ids, the
target token of an answer (the first token of " " + answer), right-padded batches, and accepting
`Prompt`-like objects (with .prompt, .answer, .candidates) in place of separate lists.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import DiffMambaError

__all__ = ["first_token", "prompt_ids", "padded_batches", "unpad", "unpack_prompts", "story_ids", "check_log_probs"]


def _is_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def first_token(text_or_id, tokenizer, what: str = "answer") -> tuple[int, int, str]:
    """First token of " " + text -> (token id, number of tokens, the text); an int is taken as a token id.

    DiffMambaError (one line) for a negative token id, a text whose first token is the tokenizer's
    unknown token (a word outside the vocabulary would be scored as `<unk>`), and anything that is
    neither a string nor a token id.
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
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is not None and ids[0] == unk_id:
        unk = getattr(tokenizer, "unk_token", None) or "<unk>"
        if text_or_id.strip().split(" ")[0] != unk:
            raise DiffMambaError(
                f"{what} {text_or_id!r} is not in the tokenizer's vocabulary: its first token would be the "
                f"unknown token {unk!r}, and {unk!r} would be scored in its place"
            )
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
