"""Logit lens and tuned lens over the residual stream (SPEC §4).

Layer numbering: layer 0 = embeddings (`hook_embed`), layer k = residual after block k − 1
(`blocks.{k-1}.hook_resid_post`), k = 1..n_layers; so a model has n_layers + 1 lens layers and at
k = n_layers the logit lens is the model's own output.

Shapes: B = batch, L = pos, P = number of positions read, d = d_model, V = vocab, K = n_layers + 1.

`Lens` is a plain class rather than an `nn.Module` because `TunedLens.train(model, data, ...)` is
the training entry point and `nn.Module.train(mode)` would clash with it; the trainable part of a
tuned lens is its `translators` (an `nn.ModuleList`). Modelled on tuned-lens
(`tuned_lens/nn/lenses.py`, Belrose et al. 2023).
"""

from __future__ import annotations

import json
import math
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import DiffMambaError
from ..scan import compute_dtype

__all__ = ["Lens", "LogitLens", "TunedLens", "TrainConfig", "logit_lens", "residuals", "lens_layers",
           "LENS_WEIGHTS", "LENS_CONFIG"]

LENS_WEIGHTS = "tuned_lens.safetensors"
LENS_CONFIG = "tuned_lens.json"


def lens_layers(model) -> list[str]:
    """Hook name of each lens layer: ["hook_embed", "blocks.0.hook_resid_post", ...] (K entries)."""
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]


def _positions(positions, L: int) -> list[int] | None:
    """Normalise positions (None, an int or ints, negatives counting from the end) to indices 0..L−1."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        positions = positions.flatten().tolist()
    elif isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        q = int(p) + L if int(p) < 0 else int(p)
        if not 0 <= q < L:
            raise DiffMambaError(f"position {p} is out of range for a sequence of {L} tokens")
        out.append(q)
    if not out:
        raise DiffMambaError("positions is empty")
    return out


def residuals(model, input_ids: torch.Tensor, positions=None, return_logits: bool = False):
    """Residual stream at every lens layer, no grad -> [K, B, P, d] (and the logits [B, L, V]).

    Only the requested positions are kept while the forward runs, so long prompts read at one
    position cost K·B·d memory, not K·B·L·d.
    """
    model.check_input_ids(input_ids)
    pos = _positions(positions, input_ids.shape[1])
    names = lens_layers(model)
    index = {n: k for k, n in enumerate(names)}
    found: list[torch.Tensor | None] = [None] * len(names)
    dt = compute_dtype(model.dtype)

    def grab(t, hook):
        found[index[hook.name]] = (t if pos is None else t[:, pos]).detach().to(dt)

    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda n: n in index, grab)]):
        logits = model(input_ids.to(model.device))
    resid = torch.stack(found)  # [K, B, P, d]
    return (resid, logits) if return_logits else resid


class Lens(ABC):
    """Maps the residual h at lens layer k to logits. Subclasses define `transform(h, layer)`.

    `forward(h, layer, model=None) -> logits [..., V]` (model defaults to the one bound at
    construction); `log_probs(model, input_ids, positions=None) -> [K, B, P, V]`;
    `kl_to_final(model, input_ids) -> [K]` (mean KL(final ‖ lens) per layer, nats).
    """

    def __init__(self, model=None):
        self.model = model

    @abstractmethod
    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h [..., d] at lens layer `layer` -> the residual handed to norm_f + lm_head."""

    def check_model(self, model) -> None:
        """Raise DiffMambaError if this lens cannot read `model` (a tuned lens checks sizes)."""

    def _model(self, model):
        model = model if model is not None else self.model
        if model is None:
            raise DiffMambaError(f"{type(self).__name__} has no model: pass model= or build it with {type(self).__name__}(model)")
        return model

    def forward(self, h: torch.Tensor, layer: int, model=None) -> torch.Tensor:
        """h [..., d] at lens layer `layer` (0..n_layers) -> logits [..., V] via the model's unembed."""
        model = self._model(model)
        if not 0 <= layer <= model.cfg.n_layers:
            raise DiffMambaError(f"lens layer {layer} out of range 0..{model.cfg.n_layers}")
        return model.unembed(self.transform(h, layer))

    def __call__(self, h: torch.Tensor, layer: int, model=None) -> torch.Tensor:
        return self.forward(h, layer, model)

    def log_probs(self, model, input_ids: torch.Tensor, positions=None) -> torch.Tensor:
        """input_ids [B, L] -> lens log-probs [K, B, P, V] (P = L, or len(positions)); no grad."""
        model = self._model(model)
        self.check_model(model)
        return self._log_probs(model, residuals(model, input_ids, positions))

    def _log_probs(self, model, resid: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # resid [K, B, P, d] -> [K, B, P, V]
            return torch.stack([F.log_softmax(self.forward(resid[k], k, model).to(resid.dtype), -1) for k in range(len(resid))])

    def kl_to_final(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean over batch and positions of KL(model's distribution ‖ lens distribution) per layer -> [K] (nats)."""
        model = self._model(model)
        self.check_model(model)
        resid, logits = residuals(model, input_ids, return_logits=True)
        lp = self._log_probs(model, resid)  # [K, B, L, V]
        final = F.log_softmax(logits.detach().to(lp.dtype), -1)  # [B, L, V]
        return (final.exp() * (final - lp)).sum(-1).mean((1, 2))


class LogitLens(Lens):
    """The logit lens: norm_f and lm_head applied directly to each layer's residual."""

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h


def logit_lens(model, input_ids: torch.Tensor, positions=None) -> torch.Tensor:
    """Logit-lens log-probs [n_layers + 1, B, L or len(positions), V]; layer n_layers = the model's output."""
    return LogitLens(model).log_probs(model, input_ids, positions)


@dataclass
class TrainConfig:
    """How a tuned lens was trained (written to tuned_lens.json)."""

    steps: int
    lr: float
    seed: int
    batch: int
    seq_len: int
    n_tokens: int  # length of the training token stream
    final_loss: float | None = None  # mean KL over layers 0..n_layers−1 at the last step (nats)


class TunedLens(Lens):
    """Tuned lens: per layer k < n_layers an affine translator h -> h + A_k h + b_k (`nn.Linear(d, d)`
    initialised to zero, so at init it is the logit lens); layer n_layers stays the identity, so the
    last layer is the model's output. Trained with `TunedLens.train(model, data, ...)` to minimise
    KL(final distribution ‖ lens distribution); saved next to a checkpoint with `save(dir)` and read
    back with `TunedLens.load(dir, model)`.
    """

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__(model)
        self.n_layers = model.cfg.n_layers
        self.d_model = model.cfg.d_model
        self.arch = model.cfg.arch
        self.train_config: TrainConfig | None = None
        self.history: list[float] = []  # training loss per step
        self.translators = nn.ModuleList(nn.Linear(self.d_model, self.d_model) for _ in range(self.n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.translators.to(device=model.device, dtype=dtype)
        self.translators.requires_grad_(False)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if layer >= self.n_layers:
            return h
        t = self.translators[layer]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    def check_model(self, model) -> None:
        cfg = model.cfg
        if (cfg.n_layers, cfg.d_model) != (self.n_layers, self.d_model):
            raise DiffMambaError(
                f"tuned lens is for n_layers={self.n_layers}, d_model={self.d_model} but the model has "
                f"n_layers={cfg.n_layers}, d_model={cfg.d_model}"
            )

    def parameters(self):
        return self.translators.parameters()

    def to(self, *args, **kwargs) -> "TunedLens":
        """Move or cast the translators (as `nn.Module.to`)."""
        self.translators.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.translators.state_dict().items()}

    # -- training --------------------------------------------------------------------------------
    @classmethod
    def train(cls, model, data, steps: int = 500, lr: float = 1e-3, seed: int = 0, batch: int = 8,
              seq_len: int = 128, progress: bool = True, tokenizer=None) -> "TunedLens":
        """Train a new tuned lens on `data` and return it. The model is frozen: its residuals and final
        log-probs are collected under no_grad and only the translators get gradients (Adam).

        data: a path to a text file, a list of texts (each tokenized with the model's tokenizer and
        joined with eos), a list of (prompt, answer) pairs (text = prompt + " " + answer), or token
        ids (a 1-d or 2-d tensor or a list of 1-d tensors; joined into one stream). Each step reads
        `batch` windows of `seq_len` tokens at random offsets drawn from a generator seeded with
        `seed`, so two trainings with the same arguments give identical weights.
        Loss per step: Σ_{k < n_layers} mean over tokens of KL(p_final ‖ p_lens_k) / n_layers.
        """
        for name, v in (("steps", steps), ("batch", batch), ("seq_len", seq_len)):
            if not isinstance(v, int) or v <= 0:
                raise DiffMambaError(f"{name} must be a positive integer, got {v!r}")
        stream = token_stream(data, tokenizer if tokenizer is not None else model.tokenizer)
        if stream.numel() < 2:
            raise DiffMambaError(f"tuned-lens training data has {stream.numel()} tokens; need at least 2")
        if int(stream.max()) >= model.cfg.vocab_size or int(stream.min()) < 0:
            raise DiffMambaError(f"training token ids must lie in 0..{model.cfg.vocab_size - 1}")
        seq_len = min(seq_len, stream.numel())
        lens = cls(model)
        params = list(lens.translators.parameters())
        lens.translators.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len)
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
            for k in range(lens.n_layers):  # one graph per layer keeps memory at one [B, L, V]
                lp = F.log_softmax(lens.forward(resid[k], k, model).to(resid.dtype), -1)
                loss = (p * (target - lp)).sum(-1).mean() / lens.n_layers
                loss.backward(inputs=params)
                total += float(loss.detach())
            opt.step()
            loss_value = total
            lens.history.append(total)
            bar.set_postfix(kl=f"{total:.4f}")
        lens.translators.requires_grad_(False)
        lens.train_config = TrainConfig(steps=steps, lr=lr, seed=seed, batch=batch, seq_len=seq_len,
                                        n_tokens=int(stream.numel()), final_loss=loss_value)
        return lens

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write tuned_lens.safetensors (translator weights) and tuned_lens.json into `directory`."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, str(d / LENS_WEIGHTS))
        meta = {
            "format": "diffmamba_interp.TunedLens",
            "version": 1,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "arch": self.arch,
            "dtype": str(self.translators[0].weight.dtype).removeprefix("torch.") if self.n_layers else "float32",
            "identity_layers": [self.n_layers],
            "train": asdict(self.train_config) if self.train_config else None,
        }
        (d / LENS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory, model) -> "TunedLens":
        """Read a tuned lens saved with `save(directory)` for `model`; DiffMambaError when absent or
        when its n_layers / d_model do not match the model."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / LENS_CONFIG).is_file() or not (d / LENS_WEIGHTS).is_file():
            raise DiffMambaError(
                f"no tuned lens in {d} (expected {LENS_CONFIG} and {LENS_WEIGHTS}); train one with "
                "TunedLens.train(model, data) and save it with lens.save(dir)"
            )
        try:
            meta = json.loads((d / LENS_CONFIG).read_text(encoding="utf-8"))
            n_layers, d_model = int(meta["n_layers"]), int(meta["d_model"])
        except (ValueError, KeyError, TypeError) as e:
            raise DiffMambaError(f"{d / LENS_CONFIG} is not a valid tuned-lens config: {e}") from None
        cfg = model.cfg
        if (n_layers, d_model) != (cfg.n_layers, cfg.d_model):
            raise DiffMambaError(
                f"tuned lens in {d} is for n_layers={n_layers}, d_model={d_model} but the model has "
                f"n_layers={cfg.n_layers}, d_model={cfg.d_model}"
            )
        dtype = getattr(torch, str(meta.get("dtype", "float32")), torch.float32)
        lens = cls(model, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
        state = load_file(str(d / LENS_WEIGHTS))
        try:
            lens.translators.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "state dict mismatch"
            raise DiffMambaError(f"{d / LENS_WEIGHTS} does not match the tuned-lens layout: {first}") from None
        lens.translators.to(model.device)
        if meta.get("train"):
            lens.train_config = TrainConfig(**meta["train"])
        return lens


def token_stream(data, tokenizer=None) -> torch.Tensor:
    """Training data (see `TunedLens.train`) -> one 1-d LongTensor of token ids."""
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
