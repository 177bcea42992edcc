"""Target (needle) probability per lens layer, its signal-to-noise ratio, and bootstrap summaries (SPEC §4).

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
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..errors import DiffMambaError
from ..schemas import SUMMARY_COLUMNS, TARGET_COLUMNS
from .lens import Lens, LogitLens, TunedLens
from .stats import bootstrap_mean

__all__ = ["MEASURES", "TARGET_COLUMNS", "SUMMARY_COLUMNS", "target_probs", "snr_summary", "resolve_lens",
           "first_token", "length_batches"]

MEASURES = ("prob", "logprob", "rank", "snr_db", "distractor_ratio")
P_CLAMP = 1e-12


def resolve_lens(model, lens) -> Lens:
    """"logit" -> LogitLens; "tuned" -> `model.tuned_lens` if set, else a tuned lens saved in the
    model's checkpoint directory (`model.checkpoint_path` / `model.name_or_path`); a Lens -> itself."""
    if isinstance(lens, Lens):
        lens.check_model(model)
        return lens
    if lens == "logit":
        return LogitLens(model)
    if lens == "tuned":
        attached = getattr(model, "tuned_lens", None)
        if isinstance(attached, TunedLens):
            attached.check_model(model)
            return attached
        for attr in ("checkpoint_path", "name_or_path", "path"):
            path = getattr(model, attr, None)
            if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__"):
                return TunedLens.load(path, model)
        raise DiffMambaError(
            "lens='tuned' needs a trained tuned lens: pass lens=TunedLens.load(dir, model) "
            "(or train one with TunedLens.train(model, data))"
        )
    raise DiffMambaError(f"unknown lens {lens!r}; expected 'logit', 'tuned' or a Lens")


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


def _prompt_ids(prompt, tokenizer) -> list[int]:
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


def length_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> Iterable[list[int]]:
    """Indices of `seqs` grouped by length (first-appearance order), in chunks of at most batch_size."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise DiffMambaError(f"batch_size must be a positive integer, got {batch_size!r}")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        groups[len(s)].append(i)
    for idx in groups.values():
        for j in range(0, len(idx), batch_size):
            yield idx[j:j + batch_size]


def _unpack_prompts(prompts, answers, candidates):
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


def target_probs(model, prompts, answers=None, lens="logit", candidates=None, tokenizer=None,
                 batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Lens probability of each answer's first token at the last prompt position, per layer.

    prompts: texts (or token-id sequences), or `Prompt` objects when answers is None.
    answers: strings (target = first token of " " + answer) or token ids.
    lens: "logit", "tuned" (see `resolve_lens`) or a `Lens`.
    candidates: per example a list of other answers (strings or ids) for the distractor ratio.
    Returns one row per (example, layer), columns `TARGET_COLUMNS`; layer 0 = embeddings.
    """
    prompts, answers, candidates = _unpack_prompts(prompts, answers, candidates)
    if not prompts:
        raise DiffMambaError("no prompts")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    lens = resolve_lens(model, lens)
    seqs = [_prompt_ids(p, tok) for p in prompts]
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
        lp = lens.log_probs(model, ids, positions=[-1])[:, :, 0].double()  # [K, b, V]
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
