"""Target (needle) probability per lens layer, its signal-to-noise ratio, and bootstrap summaries
(docs/conventions.md, "Lens and SNR").

`target_probs` reads the lens distribution at the last prompt position for the first token of
``" " + answer``. Prompts are sorted by length and batched right-padded: a causal model read at each
row's own last token never sees the padding after it, so this is exact.
The log-softmax is taken in float64, so p close to 1 stays apart from 1.

Per (example, layer) it reports (`layer` ours, 0 = embeddings; `paper_layer` = layer − 1, the
index of the paper's Figure 6, <NA> at layer 0)
- prob = p(target), logprob = log p(target), rank = 1 + #tokens with a strictly higher log-prob;
- snr_db = 10·log10(p / (1 − p)), the log-odds of the target against all other mass, computed from
  the float64 log-probability with no floor (`stats.log_odds_db`);
- distractor_ratio = p(target) / Σ p(c) over the other candidate answers' first tokens (the
  candidates, e.g. `Prompt.candidates`, are the other answers that occur in the story; a candidate
  whose first token is the target's is dropped, duplicates count once), NaN when there are none;
  distractor_log_ratio = its natural log. A few huge ratios dominate the mean of the ratio, so
  summaries should read the mean of the log-ratio and the median.
- story: the cluster of the example (`Prompt.meta["story"]`; the example itself when unknown), which
  `snr_summary` resamples by default.
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
from ..schemas import SUMMARY_COLUMNS, TARGET_COLUMNS, paper_layer, with_paper_layer
from ..distributed import gather_rows, is_main, shard
from .inputs import check_log_probs, encode_prompts, first_token, padded_batches, story_ids, unpack_prompts, unpad
from .lens import resolve_lens
from .stats import bootstrap_mean, log_odds_db, log_ratio

__all__ = ["MEASURES", "TARGET_COLUMNS", "SUMMARY_COLUMNS", "target_probs", "snr_summary"]

MEASURES = ("prob", "logprob", "rank", "snr_db", "distractor_ratio", "distractor_log_ratio")
BOOTSTRAPS = ("story", "question")  # what the bootstrap resamples: story clusters or questions


def target_probs(model, prompts, answers=None, lens="logit", candidates=None, tokenizer=None,
                 batch_size: int = 8, progress: bool = True, stories=None, chunk_size: int | None = None,
                 lengths=None, warned: set | None = None) -> pd.DataFrame:
    """Lens probability of each answer's first token at the last prompt position, per layer.

    prompts: texts (or token-id sequences), or `Prompt` objects when answers is None.
    answers: strings (target = first token of " " + answer) or token ids.
    lens: a name of `lens.LENSES` ("logit", "tuned") or a `Lens` (see `lens.resolve_lens`).
    candidates: per example a list of other answers (strings or ids) for the distractor ratio.
    stories: per example its story (cluster) id; by default `Prompt.meta["story"]`, else the example.
    chunk_size: long prompts run in pieces of this many tokens with the state carried (default
    `recurrent.DEFAULT_CHUNK`), only the last position is read, so memory does not grow with length.
    lengths: with prompts a right-padded LongTensor [B, L], each row's real length (as from
    `model.to_tokens(texts, return_lengths=True)`): each row is read at its own last token.
    warned: warnings about unknown tokens in the prompts already given (by a caller running several
    models on the same prompts): not repeated (`inputs.encode_prompts`).
    Returns one row per (example, layer), columns `TARGET_COLUMNS`; layer 0 = embeddings.
    Raises DiffMambaError when a log-probability is NaN (non-finite weights or activations).
    """
    if lengths is not None:
        prompts = unpad(prompts, lengths)
    if answers is None and not isinstance(prompts, (str, torch.Tensor)):
        prompts = list(prompts)  # Prompt objects: their stories too
        if stories is None:
            stories = story_ids(prompts)
    prompts, answers, candidates = unpack_prompts(prompts, answers, candidates)
    if not prompts:
        raise DiffMambaError("no prompts")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    lens = resolve_lens(model, lens)
    seqs = encode_prompts(prompts, tok, seen=warned)  # one warning for prompts with unknown tokens
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
    cand_log_mass = np.full((n, K), np.nan)
    mine = shard(n, [len(s) for s in seqs])  # under torchrun: this rank's examples (all of them in one process)
    bar = tqdm(total=len(mine), desc="target probs", file=sys.stderr, disable=not progress or not is_main())
    for local, ids, last in padded_batches([seqs[i] for i in mine], batch_size):
        idx = [mine[j] for j in local]
        lp = check_log_probs(lens.log_probs(model, ids.to(model.device), dtype=torch.float64, chunk_size=chunk_size,
                                            row_positions=last)[:, :, 0], model)  # [K, b, V]
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
                cand_log_mass[i] = torch.logsumexp(lp[:, j, c], -1).cpu().numpy()
        bar.update(len(idx))
    bar.close()
    gather_rows(mine, logprob, rank, cand_log_mass)  # every rank: all rows

    if stories is not None and len(stories) != n:
        raise DiffMambaError(f"{n} prompts but {len(stories)} story ids")
    log_r = log_ratio(logprob, cand_log_mass)  # NaN without candidates
    layers = np.tile(np.arange(K), n)
    return pd.DataFrame({
        "example": np.repeat(np.arange(n), K),
        "story": np.repeat(np.asarray(stories if stories is not None else np.arange(n), dtype=object), K),
        "layer": layers,
        "paper_layer": paper_layer(layers),
        "prob": np.exp(logprob).ravel(),
        "logprob": logprob.ravel(),
        "rank": rank.ravel(),
        "snr_db": log_odds_db(logprob).ravel(),
        "distractor_ratio": np.exp(log_r).ravel(),
        "distractor_log_ratio": log_r.ravel(),
        "target": np.repeat([t[2] for t in targets], K),
        "n_target_tokens": np.repeat([t[1] for t in targets], K),
    }, columns=list(TARGET_COLUMNS))


def snr_summary(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, measures: Sequence[str] = MEASURES,
                ci: float = 0.95, bootstrap: str = "story", min_n: int = 10) -> pd.DataFrame:
    """Per (model, layer, measure): mean, median and bootstrap percentile CI of the mean over examples.

    df: `target_probs` rows (columns example, layer and the measures), with a `model` column when
    several models are stacked; without one the `model` column of the result is "model".
    bootstrap: "story" (default) resamples the `story` clusters (questions of one story are not
    independent), "question" resamples questions as if independent. One set of resamples (seeded)
    is drawn per model and shared by all layers and measures. NaN values (a distractor ratio
    without candidates) are left out. `n` / `n_clusters` count what the interval rests on;
    `significant` is true where the CI excludes 0, has positive width and rests on ≥ `min_n`
    clusters (`stats.BootstrapResult.significant`). Returns columns `SUMMARY_COLUMNS`.
    """
    if bootstrap not in BOOTSTRAPS:
        raise DiffMambaError(f"unknown bootstrap {bootstrap!r}; expected one of {', '.join(BOOTSTRAPS)}")
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
        clusters = example_clusters(g, bootstrap)
        for m in measures:
            wide = g.pivot(index="example", columns="layer", values=m).reindex(columns=layers)  # [n, layers]
            res = bootstrap_mean(wide.to_numpy(dtype=np.float64), n_boot=n_boot, seed=seed, ci=ci,
                                 clusters=None if clusters is None else clusters.reindex(wide.index).to_numpy(),
                                 min_n=min_n)
            sig = res.significant
            for j, layer in enumerate(layers):
                rows.append((model, int(layer), m, res.mean[j], res.median[j], res.ci_low[j], res.ci_high[j],
                             int(res.n[j]), int(res.n_clusters[j]), bool(sig[j])))
    out = with_paper_layer(rows, SUMMARY_COLUMNS)
    order = {m: i for i, m in enumerate(measures)}
    models = {m: i for i, m in enumerate(dict.fromkeys(data["model"]))}
    return out.sort_values(["model", "layer", "measure"], key=lambda s: s.map(models) if s.name == "model" else
                           (s.map(order) if s.name == "measure" else s), kind="stable").reset_index(drop=True)


def example_clusters(rows: pd.DataFrame, bootstrap: str) -> pd.Series | None:
    """example -> cluster id for the bootstrap: the story (when the rows have one), else None (questions)."""
    if bootstrap == "question" or "story" not in rows.columns:
        return None
    per = rows.drop_duplicates("example").set_index("example")["story"]
    return per.astype(str)
