"""Attention to the needle: over prompts with supporting facts (bAbI / BABILong), the share of the
answer row's mass that falls on the supporting-fact tokens, per layer and map, with bootstrap CIs,
and model vs model. The attention-side counterpart of the SNR figure: the paper's noise argument
predicts that a differential layer's operator puts more of its mass on the needle than on filler.

For one prompt, layer and map r (a row of `answer_row.answer_row`, at the last position):
    share = Σ_{s ∈ needle} |r_s| / Σ_s |r_s|
with "needle" the tokens that overlap a supporting fact's characters; |·| because the differential
and logit rows have signs. `baseline` is the needle's share of the tokens (what a uniform row
gives), so share / baseline > 1 means the row favours the needle. The answer position itself (a
large diagonal entry, D and the conv) counts as "other".

Supporting facts: `Prompt.meta` of bAbI / BABILong / paper prompts holds ``facts`` (the story's
facts in order) and ``supporting`` (their indices); each fact is found in the prompt text in order,
after the previous one (BABILong keeps facts in order among the filler). A prompt may instead give
``meta["supporting_spans"]``: character spans [(start, end), ...].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import DiffMambaError
from .answer_row import answer_rows
from .inputs import UnknownTokenWarning, encode_prompts, first_token
from .stats import bootstrap_mean, paired_bootstrap

__all__ = ["supporting_spans", "needle_token_mask", "needle_shares", "needle_attention", "NeedleAttention"]

SUMMARY_COLUMNS = ["model", "layer", "map", "mean", "ci_low", "ci_high", "n", "baseline", "ratio"]
PAIRED_COLUMNS = ["model_a", "model_b", "layer", "map", "diff_mean", "ci_low", "ci_high", "n"]


def supporting_spans(prompt) -> list[tuple[int, int]]:
    """Character spans [(start, end)] of the prompt's supporting facts in ``prompt.prompt``."""
    meta = prompt.meta or {}
    if "supporting_spans" in meta:
        return [(int(a), int(b)) for a, b in meta["supporting_spans"]]
    facts, supporting = meta.get("facts"), meta.get("supporting")
    if facts is None or supporting is None:
        raise DiffMambaError("prompt meta has no 'facts' and 'supporting' (bAbI / BABILong / paper prompts have "
                             "them) nor 'supporting_spans': cannot tell where the needle is")
    text, at, spans = prompt.prompt, 0, []
    starts = []
    for j, fact in enumerate(facts):
        i = text.find(fact, at)
        if i < 0:
            raise DiffMambaError(f"fact {j} ({fact!r}) is not in the prompt text after position {at}")
        starts.append(i)
        at = i + len(fact)
    for k in supporting:
        spans.append((starts[k], starts[k] + len(facts[k])))
    return spans


def needle_token_mask(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [n_tokens]: tokens of ``tokenizer.encode(text, add_special_tokens=False)`` that overlap a span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
    return mask


def needle_shares(model, prompt, layers: Sequence[int] | None = None, kind: str = "block",
                  reduce: str = "mean") -> pd.DataFrame:
    """One prompt: layer, map, share, baseline (module docstring) for each layer's answer-row maps."""
    tok = model.tokenizer
    if tok is None:
        raise DiffMambaError("this model has no tokenizer: needle shares need the prompt's token offsets")
    mask = needle_token_mask(tok, prompt.prompt, supporting_spans(prompt))
    if not mask.any():
        raise DiffMambaError(f"no token of the prompt overlaps its supporting facts: {prompt.prompt[:80]!r}...")
    ids = model.to_tokens(prompt.prompt)
    if ids.shape[-1] != mask.size:
        raise DiffMambaError(f"the tokenizer's offsets ({mask.size}) and the model's tokens ({ids.shape[-1]}) differ")
    answer = first_token(prompt.answer, tok)[0]
    needle = torch.as_tensor(mask)
    rows = []
    for layer, res in answer_rows(model, ids, layers, kind=kind, reduce=reduce, answer=answer).items():
        for name, r in res.maps.items():
            mass = r[0].abs().double().cpu()
            total = float(mass.sum())
            share = float(mass[needle].sum()) / total if total > 0 else float("nan")
            rows.append({"layer": layer, "map": name, "share": share, "baseline": float(mask.mean())})
    return pd.DataFrame(rows)


@dataclass
class NeedleAttention:
    """per_example: model, example, story, layer, map, share, baseline; summary (per model, layer and
    map: mean share with its bootstrap CI, n, mean baseline, mean / baseline); paired (for every two
    models, the maps both have at a layer: mean difference b − a of the share with a paired CI)."""

    per_example: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame


def needle_attention(models, prompts, layers: Sequence[int] | None = None, kind: str = "block", reduce: str = "mean",
                     n_boot: int = 1000, seed: int = 0, labels: Sequence[str] | None = None, n: int | None = None,
                     progress: bool = False) -> NeedleAttention:
    """The needle share of each model's answer rows over `prompts` (module docstring), with CIs
    (`stats.bootstrap_mean`, resampling whole stories when the prompts name them) and paired
    differences between models (`stats.paired_bootstrap`).

    models: HookedMamba models or checkpoint paths (labelled by directory name); prompts: `Prompt`s
    or a data spec such as ``"babilong:qa2:1k"`` (then `n` examples drawn with `seed`, tokens counted
    with the first model's tokenizer)."""
    from pathlib import Path

    models = list(models)
    if any(isinstance(m, (str, Path)) for m in models):
        from ..model import load_model

        if labels is None:
            labels = [Path(m).name if isinstance(m, (str, Path)) else (getattr(m, "label", None) or m.cfg.arch)
                      for m in models]
        models = [load_model(m) if isinstance(m, (str, Path)) else m for m in models]
    if isinstance(prompts, str):
        from ..data import load_data

        prompts = load_data(prompts, n=n, seed=seed, tokenizer=models[0].tokenizer if models else None)
    prompts = list(prompts)
    if not models or not prompts:
        raise DiffMambaError("needle_attention needs at least one model and one prompt")
    labels = list(labels) if labels is not None else [getattr(m, "label", None) or m.cfg.arch for m in models]
    if len(set(labels)) != len(labels):
        labels = [f"{lab} ({i})" for i, lab in enumerate(labels)]
    frames = []
    it = prompts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(prompts, desc="needle attention")
    seen: set = set()  # one warning for prompts with unknown tokens, not one per prompt or per model
    for m in models:
        if m.tokenizer is not None:
            encode_prompts([p.prompt for p in prompts], m.tokenizer, seen=seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownTokenWarning)
        for i, p in enumerate(it):
            story = (p.meta or {}).get("story", f"example:{i}")
            for m, label in zip(models, labels):
                df = needle_shares(m, p, layers, kind, reduce)
                frames.append(df.assign(model=label, example=i, story=story))
    per = pd.concat(frames, ignore_index=True)[["model", "example", "story", "layer", "map", "share", "baseline"]]
    summary = []
    for (label, layer, name), g in per.groupby(["model", "layer", "map"], sort=False):
        g = g.sort_values("example")
        boot = bootstrap_mean(g["share"].to_numpy(), n_boot=n_boot, seed=seed, clusters=g["story"].to_numpy())
        base = float(g["baseline"].mean())
        summary.append({"model": label, "layer": layer, "map": name, "mean": float(boot.mean[0]),
                        "ci_low": float(boot.ci_low[0]), "ci_high": float(boot.ci_high[0]), "n": int(boot.n[0]),
                        "baseline": base, "ratio": float(boot.mean[0]) / base if base > 0 else float("nan")})
    paired = []
    for ia in range(len(labels)):
        for ib in range(ia + 1, len(labels)):
            a, b = per[per.model == labels[ia]], per[per.model == labels[ib]]
            both = a.merge(b, on=["example", "story", "layer", "map"], suffixes=("_a", "_b")).sort_values("example")
            for (layer, name), g in both.groupby(["layer", "map"], sort=False):
                boot = paired_bootstrap(g["share_a"].to_numpy(), g["share_b"].to_numpy(), n_boot=n_boot, seed=seed,
                                        clusters=g["story"].to_numpy())
                paired.append({"model_a": labels[ia], "model_b": labels[ib], "layer": layer, "map": name,
                               "diff_mean": float(boot.mean[0]), "ci_low": float(boot.ci_low[0]),
                               "ci_high": float(boot.ci_high[0]), "n": int(boot.n[0])})
    return NeedleAttention(per, pd.DataFrame(summary, columns=SUMMARY_COLUMNS), pd.DataFrame(paired, columns=PAIRED_COLUMNS))
