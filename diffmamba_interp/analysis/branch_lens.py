"""Branch lens: the direct contribution of each differential branch to a target token's logit.

For a differential block (Diff-Mamba-1/2, docs/conventions.md, "Blocks") with o1 = `mixer_1.hook_out`,
o2 = `mixer_2.hook_out`, λ = `hook_lambda` and s_sub = `subln.hook_scale` at the read position,

    block out = (1 − λ_init) · w_subln ⊙ ((o1 − λ·o2) · s_sub)
              = (1 − λ_init) · w_subln ⊙ (o1 · s_sub)          <- "mixer_1"
              + (1 − λ_init) · w_subln ⊙ (−λ · o2 · s_sub)     <- "-λ·mixer_2"

(exact, because the subln scale is read from the forward pass, i.e. frozen). Any vector v written
to the residual is mapped to the target logit with the final norm frozen at that position
(direct logit attribution): dla(v) = (w_norm_f ⊙ v · s_f) · W_U[target], s_f = `norm_f.hook_scale`.
Since the final residual is embed + Σ_blocks mixer_out and norm_f is linear given s_f, the
embedding's and all blocks' "block" contributions add up to the model's target logit (lm_head has
no bias).

Rows use block indices (block i writes into lens layer i + 1); plain blocks (Mamba, the plain layers
of Diff-Mamba, Diff-S6) get a "block" row only, so a Mamba model can be compared block by block.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..errors import DiffMambaError
from ..recurrent import collect
from ..scan import compute_dtype
from ..schemas import BRANCH_COMPONENTS
from ..differential import Differential
from .inputs import encode_prompts, first_token, padded_batches, unpad

__all__ = ["BRANCH_COMPONENTS", "branch_lens", "direct_logit"]

def direct_logit(model, vec: torch.Tensor, scale_f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """vec [b, d] written to the residual, scale_f [b, 1] (norm_f.hook_scale), targets [b] -> [b]."""
    w_f = model.norm_f.weight.to(vec.dtype)  # [d]
    w_u = model.lm_head.weight.to(vec.dtype)[targets]  # [b, d]
    return ((w_f * vec * scale_f.to(vec.dtype)) * w_u).sum(-1)


def final_norm_scale(model, resid: torch.Tensor) -> torch.Tensor:
    """norm_f's 1/rms (its `hook_scale`) for final residuals resid [b, d] -> [b, 1], read from norm_f itself."""
    seen = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[("norm_f.hook_scale", lambda t, hook: seen.update(s=t))]):
        model.norm_f(resid.to(model.norm_f.weight.dtype))
    return seen["s"].to(resid.dtype)


def _batch_contributions(model, ids: torch.Tensor, tids: torch.Tensor, rows: list[int], include_embed: bool,
                         chunk_size: int | None):
    """-> list of (block index, component, values [b]) for one right-padded batch read at `rows` (one
    position per row)."""
    diff = [i for i, b in enumerate(model.blocks) if isinstance(b, Differential)]
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    names = {"hook_embed", final} | {f"blocks.{i}.hook_mixer_out" for i in range(model.cfg.n_layers)}
    for i in diff:
        b1, b2 = model.blocks[i].BRANCHES
        names |= {f"blocks.{i}.{b1}.hook_out", f"blocks.{i}.{b2}.hook_out", f"blocks.{i}.hook_lambda",
                  f"blocks.{i}.subln.hook_scale"}
    dt = compute_dtype(model.dtype)
    cache = {k: (v if v.ndim == 0 else v[:, 0]) for k, v in
             collect(model, ids, names, chunk_size=chunk_size, dtype=dt, row_positions=rows).items()}
    with torch.no_grad():
        s_f = final_norm_scale(model, cache[final])  # [b, 1]
        dla = lambda v: direct_logit(model, v, s_f, tids)  # noqa: E731
        out = []
        if include_embed:
            out.append((-1, "embed", dla(cache["hook_embed"])))
        for i, block in enumerate(model.blocks):
            if i in diff:
                b1, b2 = block.BRANCHES
                o1, o2 = cache[f"blocks.{i}.{b1}.hook_out"], cache[f"blocks.{i}.{b2}.hook_out"]  # [b, d]
                lam, s = cache[f"blocks.{i}.hook_lambda"], cache[f"blocks.{i}.subln.hook_scale"]  # [], [b, 1]
                t1, t2 = block.branch_terms(o1, o2, lam, s)
                out.append((i, BRANCH_COMPONENTS[0], dla(t1)))
                out.append((i, BRANCH_COMPONENTS[1], dla(t2)))
            out.append((i, BRANCH_COMPONENTS[2], dla(cache[f"blocks.{i}.hook_mixer_out"])))
    return out


def branch_lens(model, input_ids, targets, position: int = -1, include_embed: bool = False,
                tokenizer=None, batch_size: int = 8, progress: bool = True, chunk_size: int | None = None,
                lengths=None) -> pd.DataFrame:
    """Direct logit contribution of mixer_1, −λ·mixer_2 and the whole block, per example and block.

    input_ids: a LongTensor [batch, pos], or a list of prompts (texts or id sequences; batched
    right-padded, which is exact for a causal model read at each row's own position). targets: one per example, token ids or strings (first token of
    " " + target). position: where to read (default the last token of each prompt).
    include_embed: also a row (layer −1, component "embed") for the embedding's direct contribution,
    so that per example the embed and "block" rows sum to the target logit.
    chunk_size: long prompts run in pieces with the state carried (`recurrent.collect`).
    lengths: with input_ids a right-padded LongTensor, each row's real length (`position` then counts
    in each row's own tokens).
    Returns columns example, layer (block index), component, value.
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if lengths is not None:
        model.check_input_ids(input_ids)
        seqs = unpad(input_ids, lengths)
    elif isinstance(input_ids, torch.Tensor):
        model.check_input_ids(input_ids)
        seqs = input_ids.tolist()
    else:
        seqs = encode_prompts(list(input_ids), tok)  # one warning for prompts with unknown tokens
    if isinstance(targets, torch.Tensor):
        targets = targets.flatten().tolist()
    elif isinstance(targets, (int, str)):
        targets = [targets]
    targets = list(targets)
    if len(targets) != len(seqs):
        raise DiffMambaError(f"{len(seqs)} examples but {len(targets)} targets")
    tids = [first_token(t, tok, what="target")[0] for t in targets]
    bad = [t for t in tids if not 0 <= t < model.cfg.vocab_size]
    if bad:
        raise DiffMambaError(f"target token id {bad[0]} is out of range for vocab size {model.cfg.vocab_size}")

    rows: list[tuple[int, int, str, float]] = []
    bar = tqdm(total=len(seqs), desc="branch lens", file=sys.stderr, disable=not progress)
    for idx, ids, last in padded_batches(seqs, batch_size):
        read = []
        for i, end in zip(idx, last):
            pos = position + end + 1 if position < 0 else position
            if not 0 <= pos <= end:
                raise DiffMambaError(f"position {position} is out of range for a prompt of {end + 1} tokens")
            read.append(pos)
        t = torch.tensor([tids[i] for i in idx], device=model.device)
        for layer, comp, vals in _batch_contributions(model, ids.to(model.device), t, read, include_embed, chunk_size):
            rows.extend((ex, layer, comp, float(v)) for ex, v in zip(idx, vals.cpu().tolist()))
        bar.update(len(idx))
    bar.close()
    df = pd.DataFrame(rows, columns=["example", "layer", "component", "value"])
    order = {c: k for k, c in enumerate(("embed", *BRANCH_COMPONENTS))}
    df = df.sort_values(["example", "layer", "component"], kind="stable",
                        key=lambda s: s.map(order) if s.name == "component" else s)
    df["value"] = df["value"].astype(np.float64)
    return df.reset_index(drop=True)
