"""Preparing analysis inputs, shared by every analysis that reads prompts: prompts to token ids, the
target token of an answer (the first token of " " + answer), right-padded batches, and accepting
`Prompt`-like objects (with .prompt, .answer, .candidates) in place of separate lists.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import DiffMambaError

__all__ = ["first_token", "prompt_ids", "padded_batches", "unpack_prompts", "story_ids"]


def first_token(text_or_id, tokenizer, what: str = "answer") -> tuple[int, int, str]:
    """First token of " " + text -> (token id, number of tokens, the text); an int is taken as a token id."""
    if isinstance(text_or_id, (int, np.integer)) and not isinstance(text_or_id, bool):
        tid = int(text_or_id)
        label = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
        return tid, 1, label
    if not isinstance(text_or_id, str):
        raise DiffMambaError(f"{what} must be a string or a token id, got {type(text_or_id).__name__}")
    if tokenizer is None:
        raise DiffMambaError(f"{what} {text_or_id!r} is text but there is no tokenizer; pass tokenizer= or token ids")
    ids = tokenizer.encode(" " + text_or_id, add_special_tokens=False)
    if not ids:
        raise DiffMambaError(f"{what} {text_or_id!r} produces no tokens (first token of ' ' + {what} is the target)")
    return int(ids[0]), len(ids), text_or_id


def prompt_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise DiffMambaError("prompts are text but there is no tokenizer; pass tokenizer= or token ids")
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.flatten().tolist()
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise DiffMambaError(f"prompt {str(prompt)[:60]!r} produces no tokens")
    return ids


def unpack_prompts(prompts, answers, candidates):
    """Accept `Prompt`-like objects (with .prompt, .answer, .candidates) when answers is None."""
    prompts = list(prompts)
    if answers is None:
        if not all(hasattr(p, "prompt") and hasattr(p, "answer") for p in prompts):
            raise DiffMambaError("answers is missing: pass answers=, or Prompt objects that carry .answer")
        answers = [p.answer for p in prompts]
        if candidates is None:
            candidates = [list(getattr(p, "candidates", ()) or ()) for p in prompts]
        prompts = [p.prompt for p in prompts]
    answers = list(answers)
    if len(answers) != len(prompts):
        raise DiffMambaError(f"{len(prompts)} prompts but {len(answers)} answers")
    if candidates is not None:
        candidates = [list(c) if c is not None else [] for c in candidates]
        if len(candidates) != len(prompts):
            raise DiffMambaError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    return prompts, answers, candidates


def story_ids(prompts) -> list | None:
    """The story (cluster) of each prompt, from `Prompt.meta["story"]`: questions of one bAbI story are
    not independent, so the bootstrap resamples stories. None when the prompts carry no story ids."""
    ids = [getattr(p, "meta", {}).get("story") if isinstance(getattr(p, "meta", None), dict) else None for p in prompts]
    return ids if ids and all(i is not None for i in ids) else None


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
