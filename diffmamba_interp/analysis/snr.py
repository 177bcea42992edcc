"""Target (needle) probability per lens layer, its signal-to-noise ratio, and bootstrap summaries (docs/conventions.md, "Lens and SNR").

`target_probs` reads the lens distribution at the last prompt position for the first token of
``" " + answer``. Prompts of different lengths are grouped by token length and batched within a
group, never padded: a Mamba model has no attention mask, so padding would change its state.

Per (example, layer) it reports
- prob = p(target), logprob = log p(target), rank = 1 + #tokens with a strictly higher log-prob;
- snr_db = 10·log10(p / (1 − p)), p clamped to [1e-12, 1 − 1e-12] (the target against all other mass);
- distractor_ratio = p(target) / Σ p(c) over the other candidate answers' first tokens (the
  candidates, e.g. `Prompt.candidates`, are meant to be the other answers that occur in the context;
  a candidate whose first token is the target's is dropped, duplicates count once; the denominator
  is clamped at 1e-12), NaN when there are no candidates.
"""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..errors import DiffMambaError
from ..schemas import SUMMARY_COLUMNS, TARGET_COLUMNS
from .inputs import check_log_probs, first_token, length_batches, prompt_ids, unpack_prompts
from .lens import resolve_lens
from .stats import bootstrap_mean

__all__ = ["MEASURES", "TARGET_COLUMNS", "SUMMARY_COLUMNS", "target_probs", "snr_summary"]

MEASURES = ("prob", "logprob", "rank", "snr_db", "distractor_ratio")
P_CLAMP = 1e-12


def target_probs(model, prompts, answers=None, lens="logit", candidates=None, tokenizer=None,
                 batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Lens probability of each answer's first token at the last prompt position, per layer.

    prompts: texts (or token-id sequences), or `Prompt` objects when answers is None.
    answers: strings (target = first token of " " + answer) or token ids.
    lens: a name of `lens.LENSES` ("logit", "tuned") or a `Lens` (see `lens.resolve_lens`).
    candidates: per example a list of other answers (strings or ids) for the distractor ratio.
    Returns one row per (example, layer), columns `TARGET_COLUMNS`; layer 0 = embeddings.
    """
    prompts, answers, candidates = unpack_prompts(prompts, answers, candidates)
    if not prompts:
        raise DiffMambaError("no prompts")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    lens = resolve_lens(model, lens)
    seqs = [prompt_ids(p, tok) for p in prompts]
    targets = [first_token(a, tok) for a in answers]
    multi = [i for i, t in enumerate(targets) if t[1] > 1]
    if multi:
        i = multi[0]
        warnings.warn(f"{len(multi)} of {len(answers)} answers are several tokens (e.g. {targets[i][2]!r}: "
                      f"{targets[i][1]} tokens); the target is the first token, see n_target_tokens", stacklevel=2)
    cand_ids: list[list[int]] = []
    for i, (tid, _, _) in enumerate(targets):
        cs = candidates[i] if candidates is not None else []
        ids = dict.fromkeys(first_token(c, tok, what="candidate")[0] for c in cs)
        cand_ids.append([c for c in ids if c != tid])

    K = model.cfg.n_layers + 1
    n = len(prompts)
    logprob = np.empty((n, K))
    rank = np.empty((n, K), dtype=np.int64)
    cand_mass = np.full((n, K), np.nan)
    bar = tqdm(total=n, desc="target probs", file=sys.stderr, disable=not progress)
    for idx in length_batches(seqs, batch_size):
        ids = torch.tensor([seqs[i] for i in idx], dtype=torch.long, device=model.device)
        lp = check_log_probs(lens.log_probs(model, ids, positions=[-1])[:, :, 0].double(), model)  # [K, b, V]
        tid = torch.tensor([targets[i][0] for i in idx], device=lp.device)
        if int(tid.max()) >= lp.shape[-1] or int(tid.min()) < 0:
            raise DiffMambaError(f"a target token id is out of range for vocab size {lp.shape[-1]}")
        t_lp = lp.gather(-1, tid[None, :, None].expand(K, -1, 1))  # [K, b, 1]
        logprob[idx] = t_lp[..., 0].T.cpu().numpy()
        rank[idx] = (1 + (lp > t_lp).sum(-1)).T.cpu().numpy()
        for j, i in enumerate(idx):
            if cand_ids[i]:
                c = torch.tensor(cand_ids[i], device=lp.device)
                if int(c.max()) >= lp.shape[-1]:
                    raise DiffMambaError(f"a candidate token id is out of range for vocab size {lp.shape[-1]}")
                cand_mass[i] = lp[:, j, c].exp().sum(-1).cpu().numpy()
        bar.update(len(idx))
    bar.close()

    prob = np.exp(logprob)
    pc = np.clip(prob, P_CLAMP, 1 - P_CLAMP)
    snr_db = 10 * np.log10(pc / (1 - pc))
    ratio = prob / np.maximum(cand_mass, P_CLAMP)  # NaN stays NaN
    return pd.DataFrame({
        "example": np.repeat(np.arange(n), K),
        "layer": np.tile(np.arange(K), n),
        "prob": prob.ravel(),
        "logprob": logprob.ravel(),
        "rank": rank.ravel(),
        "snr_db": snr_db.ravel(),
        "distractor_ratio": ratio.ravel(),
        "target": np.repeat([t[2] for t in targets], K),
        "n_target_tokens": np.repeat([t[1] for t in targets], K),
    }, columns=list(TARGET_COLUMNS))


def snr_summary(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, measures: Sequence[str] = MEASURES,
                ci: float = 0.95) -> pd.DataFrame:
    """Per (model, layer, measure): mean, median and bootstrap percentile CI of the mean over examples.

    df: `target_probs` rows (columns example, layer and the measures), with a `model` column when
    several models are stacked; without one the `model` column of the result is "model". One set of
    resamples (seeded) is drawn per model and shared by all layers and measures. NaN values (a
    distractor ratio without candidates) are left out. Returns columns `SUMMARY_COLUMNS`.
    """
    need = {"example", "layer", *measures}
    missing = sorted(need - set(df.columns))
    if missing:
        raise DiffMambaError(f"snr_summary needs columns {', '.join(missing)} (rows of target_probs)")
    data = df if "model" in df.columns else df.assign(model="model")
    rows = []
    for model, g in data.groupby("model", sort=False):
        if g.duplicated(["example", "layer"]).any():
            raise DiffMambaError(f"model {model!r} has several rows for one (example, layer)")
        layers = np.sort(g["layer"].unique())
        for m in measures:
            wide = g.pivot(index="example", columns="layer", values=m).reindex(columns=layers)  # [n, layers]
            res = bootstrap_mean(wide.to_numpy(dtype=np.float64), n_boot=n_boot, seed=seed, ci=ci)
            for j, layer in enumerate(layers):
                rows.append((model, int(layer), m, res.mean[j], res.median[j], res.ci_low[j], res.ci_high[j]))
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    order = {m: i for i, m in enumerate(measures)}
    models = {m: i for i, m in enumerate(dict.fromkeys(data["model"]))}
    return out.sort_values(["model", "layer", "measure"], key=lambda s: s.map(models) if s.name == "model" else
                           (s.map(order) if s.name == "measure" else s), kind="stable").reset_index(drop=True)
