"""Decoding: prefill a prompt (in chunks, state carried), then one O(1) step per new token.

Greedy decoding takes the argmax, as transformers' `generate` does, so both produce the same tokens
on the same weights; sampling draws from softmax(logits / temperature) (over the `top_k` most
likely tokens when given) with a seeded generator.
"""

from __future__ import annotations

import torch

from .errors import DiffMambaError
from .recurrent import prefill


def _check(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DiffMambaError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise DiffMambaError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise DiffMambaError(f"top_k must be a positive integer or None, got {top_k!r}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """input_ids [batch, pos] -> [batch, pos + max_new_tokens] (see `HookedMamba.generate`)."""
    _check(max_new_tokens, temperature, top_k)
    model.check_input_ids(input_ids)
    input_ids = input_ids.to(model.device)
    if max_new_tokens == 0:
        return input_ids
    logits, state = prefill(model, input_ids, chunk_size=chunk_size)  # logits at the last position [batch, V]
    gen = torch.Generator(device=model.device)
    if seed is not None:
        gen.manual_seed(seed)
    out = [input_ids]
    for i in range(max_new_tokens):
        if do_sample:
            scores = logits.float() / temperature
            if top_k is not None and top_k < scores.shape[-1]:
                kth = scores.topk(top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, -torch.inf)
            token = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[:, 0]
        else:
            token = logits.argmax(-1)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            logits, state = model.step(token, state, in_place=True)  # generate owns its state
    return torch.cat(out, dim=1)
