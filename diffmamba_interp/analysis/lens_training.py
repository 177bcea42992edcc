"""Training a tuned lens: `train_tuned_lens(model, data, ...)` (kept apart from the `TunedLens` module,
as tuned-lens keeps `scripts/train_loop.py` apart from `nn/lenses.py`).

The recipe of Belrose et al. (tuned-lens `train_loop.py` / `ingredients.py`) is the default: SGD
with Nesterov momentum 0.9, lr 0.1, weight decay 1e-3, the learning rate decayed linearly to 0,
gradients clipped to norm 1.0, each translator trained on its own layer's KL(final ‖ lens) (the
loss summed over layers). Their runs use 250 steps of 2^18 tokens; the defaults here are sized for a
CPU (`batch` × `seq_len` tokens per step), so pass more for a publication-grade lens.
`optimizer="adam"` keeps the earlier recipe (Adam, constant lr, loss averaged over layers).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import DiffMambaError
from .lens import LensTrainConfig, TunedLens, residuals

__all__ = ["train_tuned_lens", "token_stream", "OPTIMIZERS", "general_text", "evaluate_lens", "fit_lens"]

OPTIMIZERS = ("sgd", "adam")


def _optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr)


def train_tuned_lens(model, data, steps: int = 250, lr: float | None = None, seed: int = 0, batch: int = 8,
                     seq_len: int = 128, optimizer: str = "sgd", weight_decay: float = 1e-3, clip: float = 1.0,
                     progress: bool = True, tokenizer=None) -> TunedLens:
    """Train a new tuned lens for `model` on `data` and return it. The model is frozen: its residuals
    and final log-probs are collected under no_grad and only the translators get gradients.

    data: a path to a text file, a list of texts (each tokenized with the model's tokenizer and
    joined with eos), a list of (prompt, answer) pairs (text = prompt + " " + answer), or token
    ids (a 1-d or 2-d tensor or a list of 1-d tensors; joined into one stream). Each step reads
    `batch` windows of `seq_len` tokens at random offsets drawn from a generator seeded with
    `seed`, so two trainings with the same arguments give identical weights.
    optimizer: "sgd" (Belrose et al., the default; lr defaults to 0.1, linear decay, weight decay,
    clipping) or "adam" (lr defaults to 1e-3, constant, no clipping or weight decay).
    `lens.history` is the loss per step: Σ_{k < n_layers} mean over tokens of KL(p_final ‖ p_lens_k) / n_layers.
    """
    for name, v in (("steps", steps), ("batch", batch), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise DiffMambaError(f"{name} must be a positive integer, got {v!r}")
    if optimizer not in OPTIMIZERS:
        raise DiffMambaError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    lr = lr if lr is not None else (0.1 if optimizer == "sgd" else 1e-3)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DiffMambaError(f"lr must be a positive number, got {lr!r}")
    stream = token_stream(data, tokenizer if tokenizer is not None else model.tokenizer)
    if stream.numel() < 2:
        raise DiffMambaError(f"tuned-lens training data has {stream.numel()} tokens; need at least 2")
    if int(stream.max()) >= model.cfg.vocab_size or int(stream.min()) < 0:
        raise DiffMambaError(f"training token ids must lie in 0..{model.cfg.vocab_size - 1}")
    seq_len = min(seq_len, stream.numel())
    lens = TunedLens(model)
    params = list(lens.translators.parameters())
    lens.translators.requires_grad_(True)
    opt = _optimizer(optimizer, params, lr, weight_decay)
    sgd = optimizer == "sgd"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps) if sgd else None
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    n = lens.n_layers
    bar = tqdm(range(steps), desc="tuned lens", file=sys.stderr, disable=not progress)
    loss_value = math.nan
    for _ in bar:
        starts = torch.randint(0, stream.numel() - seq_len + 1, (batch,), generator=gen)
        ids = stream[starts[:, None] + offsets]  # [B, L]
        resid, logits = residuals(model, ids, return_logits=True)  # [K, B, L, d], [B, L, V]
        target = F.log_softmax(logits.detach().to(resid.dtype), -1)  # [B, L, V]
        p = target.exp()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(n):  # one graph per layer keeps memory at one [B, L, V]
            lp = F.log_softmax(lens.forward(resid[k], k, model).to(resid.dtype), -1)
            kl = (p * (target - lp)).sum(-1).mean()
            (kl if sgd else kl / n).backward(inputs=params)  # sgd: each translator its own layer's KL
            total += float(kl.detach()) / n
        if sgd:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        loss_value = total
        lens.history.append(total)
        bar.set_postfix(kl=f"{total:.4f}")
    lens.translators.requires_grad_(False)
    lens.train_config = LensTrainConfig(steps=steps, lr=lr, seed=seed, batch=batch, seq_len=seq_len,
                                        n_tokens=int(stream.numel()), final_loss=loss_value, optimizer=optimizer)
    return lens


def token_stream(data, tokenizer=None) -> torch.Tensor:
    """Training data (see `train_tuned_lens`) -> one 1-d LongTensor of token ids."""
    if isinstance(data, torch.Tensor):
        return data.detach().flatten().long().cpu()
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise DiffMambaError(f"training data {str(data)[:80]!r} is not a file; pass a list of texts to train on raw text")
        texts = [path.read_text(encoding="utf-8")]
    else:
        items = list(data)
        if not items:
            raise DiffMambaError("tuned-lens training data is empty")
        if all(isinstance(x, torch.Tensor) for x in items):
            return torch.cat([x.detach().flatten().long().cpu() for x in items])
        texts = []
        for x in items:
            if isinstance(x, str):
                texts.append(x)
            elif isinstance(x, Sequence) and len(x) == 2 and all(isinstance(s, str) for s in x):
                texts.append(f"{x[0]} {x[1]}")
            else:
                raise DiffMambaError(f"tuned-lens training data items must be texts, (prompt, answer) pairs or tensors, got {type(x).__name__}")
    if tokenizer is None:
        raise DiffMambaError("training on text needs a tokenizer: the model has none; pass tokenizer= or token ids")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.long)


# -- held-out evaluation and the lens-train job ---------------------------------------------------
def general_text() -> str:
    """The general text tuned lenses are fitted on by default: the public-domain books shipped as
    filler (data/filler/), paragraphs joined by blank lines. (The paper used Pile validation text.)"""
    from ..data.books import book_paragraphs

    return "\n\n".join(book_paragraphs())


@torch.no_grad()
def evaluate_lens(model, lens: TunedLens, held_out: torch.Tensor, prompts=None, seq_len: int = 128,
                  max_windows: int = 64) -> list[dict]:
    """Per lens layer, mean KL(final ‖ lens) of the tuned lens and of the logit lens, in nats:
    `kl_*_all` over every position of held-out text windows (`held_out`, a 1-d token stream, cut
    into at most `max_windows` windows of `seq_len`), and `kl_*_answer` at the answer position (the
    last prompt token) of `prompts` (`Prompt`s or texts; omitted when None)."""
    from .inputs import prompt_ids
    from .lens import LogitLens
    from ..schemas import paper_layer

    logit = LogitLens(model)
    n_win = min(max_windows, held_out.numel() // seq_len)
    if n_win < 1:
        raise DiffMambaError(f"held-out text has {held_out.numel()} tokens; need at least {seq_len}")
    windows = held_out[: n_win * seq_len].view(n_win, seq_len).to(model.device)
    all_t = torch.stack([lens.kl_to_final(model, w[None]) for w in windows]).mean(0)
    all_l = torch.stack([logit.kl_to_final(model, w[None]) for w in windows]).mean(0)
    ans_t = ans_l = None
    if prompts:
        tok = model.tokenizer
        t_rows, l_rows = [], []
        for p in prompts:
            ids = torch.tensor([prompt_ids(getattr(p, "prompt", p), tok)], device=model.device)
            t_rows.append(lens.kl_to_final(model, ids, positions=[-1]))
            l_rows.append(logit.kl_to_final(model, ids, positions=[-1]))
        ans_t, ans_l = torch.stack(t_rows).mean(0), torch.stack(l_rows).mean(0)
    rows = []
    for k in range(len(all_t)):
        row = {"layer": k, "paper_layer": paper_layer(k), "kl_logit_all": float(all_l[k]),
               "kl_tuned_all": float(all_t[k])}
        if ans_t is not None:
            row |= {"kl_logit_answer": float(ans_l[k]), "kl_tuned_answer": float(ans_t[k])}
        rows.append(row)
    return rows


def fit_lens(model, text: str | None = None, steps: int = 250, seed: int = 0, batch: int = 8, seq_len: int = 128,
             optimizer: str = "sgd", lr: float | None = None, eval_prompts=None, held_out_fraction: float = 0.05,
             progress: bool = True) -> TunedLens:
    """The `lens-train` job: fit a tuned lens on `text` (default `general_text()`), holding out the last
    `held_out_fraction` of its tokens, and evaluate it (`evaluate_lens`) on that held-out text and,
    when given, at the answer position of `eval_prompts`. Returns the lens with `.evaluation` set."""
    if model.tokenizer is None:
        raise DiffMambaError(f"checkpoint {model.checkpoint_path} has no tokenizer; lens-train needs one for text")
    if not 0 < held_out_fraction < 1:
        raise DiffMambaError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    stream = token_stream([text if text is not None else general_text()], model.tokenizer)
    cut = int(stream.numel() * (1 - held_out_fraction))
    train, held = stream[:cut], stream[cut:]
    if train.numel() < 2 * seq_len or held.numel() < seq_len:
        raise DiffMambaError(f"the training text has {stream.numel()} tokens; need at least {3 * seq_len}")
    lens = train_tuned_lens(model, train, steps=steps, lr=lr, seed=seed, batch=batch, seq_len=seq_len,
                            optimizer=optimizer, progress=progress)
    lens.evaluation = evaluate_lens(model, lens, held, eval_prompts, seq_len=seq_len)
    return lens
