"""Lenses over the residual stream: the logit lens and the tuned lens (Belrose et al. 2023; modelled
on tuned-lens's `tuned_lens/nn/lenses.py`: `Lens(ABC, nn.Module)` with two small subclasses).

Layer numbering (docs/conventions.md): layer 0 = embeddings (`hook_embed`), layer k = residual after
block k − 1 (`blocks.{k-1}.hook_resid_post`), k = 1..n_layers; so a model has n_layers + 1 lens
layers and at k = n_layers the logit lens is the model's own output. (The paper's Figure 6 counts
from HF `hidden_states`, which have no embedding entry: its layer k is our layer k + 1.)

A lens is an `nn.Module` bound to its model at construction (the model is not a submodule, so the
lens's `state_dict()` holds only its own parameters). `LENSES` is the one registry of lens kinds
that the CLI and the jobs read; `resolve_lens(model, "tuned")` returns `model.tuned_lens` when one
is attached (it then follows `model.to(...)`, and is not saved with the weights), else the lens
saved next to the checkpoint. Training lives in `lens_training.py`.

Shapes: B = batch, L = pos, P = number of positions read, d = d_model, V = vocab, K = n_layers + 1.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffMambaError, one_line
from ..scan import compute_dtype

__all__ = ["Lens", "LogitLens", "TunedLens", "LensTrainConfig", "LENSES", "logit_lens", "resolve_lens", "residuals",
           "lens_layers", "LENS_WEIGHTS", "LENS_CONFIG"]

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


class Lens(nn.Module, ABC):
    """Maps the residual h at lens layer k to logits. Subclasses define `transform(h, layer)`.

    `forward(h, layer, model=None) -> logits [..., V]` (model defaults to the one bound at
    construction); `log_probs(model, input_ids, positions=None) -> [K, B, P, V]`;
    `kl_to_final(model, input_ids) -> [K]` (mean KL(final ‖ lens) per layer, nats).
    """

    def __init__(self, model=None):
        super().__init__()
        object.__setattr__(self, "model", model)  # bound, not a submodule: state_dict() is the lens's own

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
class LensTrainConfig:
    """How a tuned lens was trained (written to tuned_lens.json)."""

    steps: int
    lr: float
    seed: int
    batch: int
    seq_len: int
    n_tokens: int  # length of the training token stream
    final_loss: float | None = None  # mean KL over layers 0..n_layers−1 at the last step (nats)
    optimizer: str = "adam"  # "sgd" (Belrose et al.) or "adam"; lenses saved before this field are "adam"


class TunedLens(Lens):
    """Tuned lens: per layer k < n_layers an affine translator h -> h + A_k h + b_k (`nn.Linear(d, d)`
    initialised to zero, so at init it is the logit lens); layer n_layers stays the identity, so the
    last layer is the model's output. Trained with `lens_training.train_tuned_lens(model, data, ...)`
    to minimise KL(final distribution ‖ lens distribution); saved next to a checkpoint with
    `save(dir)` and read back with `TunedLens.load(dir, model)`.
    """

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__(model)
        self.n_layers = model.cfg.n_layers
        self.d_model = model.cfg.d_model
        self.arch = model.cfg.arch
        self.train_config: LensTrainConfig | None = None
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

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write tuned_lens.safetensors (translator weights) and tuned_lens.json into `directory`."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.translators.state_dict().items()}, str(d / LENS_WEIGHTS))
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
        """Read a tuned lens saved with `save(directory)` for `model`; a one-line DiffMambaError naming
        the file when it is absent, unreadable, corrupt, has unknown keys or non-finite weights, or
        when its n_layers / d_model do not match the model."""
        import os
        from dataclasses import fields as dataclass_fields

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..files import path_problem

        d = Path(directory)
        cfg_path, w_path = d / LENS_CONFIG, d / LENS_WEIGHTS
        if not os.path.lexists(cfg_path) or not os.path.lexists(w_path):
            raise DiffMambaError(
                f"no tuned lens in {d} (expected {LENS_CONFIG} and {LENS_WEIGHTS}); train one with "
                "diffmamba_interp.analysis.lens_training.train_tuned_lens(model, data) and save it with lens.save(dir)"
            )
        for path in (cfg_path, w_path):
            problem = path_problem(path, "file")
            if problem:
                raise DiffMambaError(f"{path}: {problem}")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DiffMambaError(f"{cfg_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DiffMambaError(f"{cfg_path}: cannot be read ({one_line(e)})") from None
        if not isinstance(meta, dict):
            raise DiffMambaError(f"{cfg_path}: expected a JSON object, got a JSON {type(meta).__name__}")
        known = {"format", "version", "n_layers", "d_model", "arch", "dtype", "identity_layers", "train"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise DiffMambaError(f"{cfg_path}: unknown key{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(map(repr, unknown))} (a tuned-lens config has {', '.join(sorted(known))})")
        for key in ("n_layers", "d_model"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DiffMambaError(f"{cfg_path}: {key!r} must be a whole number, got {value!r}")
        n_layers, d_model = meta["n_layers"], meta["d_model"]
        cfg = model.cfg
        if (n_layers, d_model) != (cfg.n_layers, cfg.d_model):
            raise DiffMambaError(
                f"tuned lens in {d} is for n_layers={n_layers}, d_model={d_model} but the model has "
                f"n_layers={cfg.n_layers}, d_model={cfg.d_model}"
            )
        dtype_name = meta.get("dtype", "float32")
        dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DiffMambaError(f"{cfg_path}: 'dtype' must be a floating-point dtype name, got {dtype_name!r}")
        train = meta.get("train")
        train_config = None
        if train is not None:
            names = {f.name for f in dataclass_fields(LensTrainConfig)}
            if not isinstance(train, dict):
                raise DiffMambaError(f"{cfg_path}: 'train' must be an object, got {type(train).__name__}")
            bad = sorted(set(train) - names)
            if bad:
                raise DiffMambaError(f"{cfg_path}: unknown key{'s' if len(bad) > 1 else ''} in 'train': "
                                     f"{', '.join(map(repr, bad))} (expected {', '.join(sorted(names))})")
            try:
                train_config = LensTrainConfig(**train)
            except TypeError as e:
                raise DiffMambaError(f"{cfg_path}: 'train' is incomplete ({one_line(e)})") from None
        lens = cls(model, dtype=dtype)
        try:
            state = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise DiffMambaError(f"{w_path}: not a valid safetensors file, truncated or corrupt ({one_line(e)})") from None
        for key, t in state.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise DiffMambaError(f"{w_path}: tensor {key} is not finite floating point ({t.dtype}); the lens would give NaN")
        try:
            lens.translators.load_state_dict(state)
        except RuntimeError as e:
            raise DiffMambaError(f"{w_path} does not match the tuned-lens layout: {one_line(e)}") from None
        lens.translators.to(model.device)
        lens.train_config = train_config
        return lens


# -- the registry of lens kinds --------------------------------------------------------------------
def _tuned(model) -> TunedLens:
    """The tuned lens attached to the model (`model.tuned_lens`), else the one saved in its checkpoint directory."""
    attached = getattr(model, "tuned_lens", None)
    if isinstance(attached, TunedLens):
        attached.check_model(model)
        return attached
    path = getattr(model, "checkpoint_path", None)
    if path is None:
        raise DiffMambaError(
            "lens='tuned' needs a trained tuned lens: pass lens=TunedLens.load(dir, model) "
            "(or train one with diffmamba_interp.analysis.lens_training.train_tuned_lens(model, data))"
        )
    return TunedLens.load(path, model)


# lens name -> function(model) -> Lens; the CLI's --lens choices and the jobs read this table
LENSES = {"logit": LogitLens, "tuned": _tuned}


def resolve_lens(model, lens) -> Lens:
    """A lens name of `LENSES` ("logit", "tuned") or a `Lens` -> a Lens for `model`."""
    if isinstance(lens, Lens):
        lens.check_model(model)
        return lens
    if lens not in LENSES:
        raise DiffMambaError(f"unknown lens {lens!r}; expected one of {', '.join(map(repr, LENSES))} or a Lens")
    return LENSES[lens](model)
