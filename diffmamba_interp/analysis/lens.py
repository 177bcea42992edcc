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

import hashlib
import json
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffMambaError, one_line
from ..files import write_atomic
from ..recurrent import collect
from ..scan import compute_dtype
from .inputs import unpad

__all__ = ["Lens", "LogitLens", "TunedLens", "LensTrainConfig", "LENSES", "logit_lens", "resolve_lens", "has_tuned_lens",
           "lens_name", "residuals",
           "lens_layers", "LENS_WEIGHTS", "LENS_CONFIG"]

LENS_WEIGHTS = "tuned_lens.safetensors"
LENS_CONFIG = "tuned_lens.json"


def lens_layers(model) -> list[str]:
    """Hook name of each lens layer: ["hook_embed", "blocks.0.hook_resid_post", ...] (K entries)."""
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]


def residuals(model, input_ids: torch.Tensor, positions=None, return_logits: bool = False,
              chunk_size: int | None = None, row_positions=None):
    """Residual stream at every lens layer, no grad -> [K, B, P, d] (and the logits [B, P, V] at those positions).

    The prompt runs in pieces of `chunk_size` tokens with the state carried (`recurrent.collect`;
    default `recurrent.DEFAULT_CHUNK`) and only the requested positions are kept, so a long prompt
    read at one position costs K·B·d memory, not K·B·L·d, and no [B, L, V] logits are built.
    row_positions: one position per row instead (P = 1): each row's last token of a right-padded batch.
    """
    model.check_input_ids(input_ids)
    names = lens_layers(model)
    kept = collect(model, input_ids, names, positions, chunk_size=chunk_size, dtype=compute_dtype(model.dtype),
                   row_positions=row_positions)
    resid = torch.stack([kept[n] for n in names])  # [K, B, P, d]
    if not return_logits:
        return resid
    with torch.no_grad():
        return resid, model.unembed(resid[-1])  # the model's logits at those positions


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

    def log_probs(self, model, input_ids: torch.Tensor, positions=None, dtype: torch.dtype | None = None,
                  chunk_size: int | None = None, row_positions=None) -> torch.Tensor:
        """input_ids [B, L] -> lens log-probs [K, B, P, V] (P = L, or len(positions)); no grad.
        dtype: of the log-softmax (default the compute dtype; float64 keeps p ≈ 1 apart from 1).
        chunk_size: tokens per piece of a long prompt; row_positions: one position per row of a
        right-padded batch (see `residuals`)."""
        model = self._model(model)
        self.check_model(model)
        resid = residuals(model, input_ids, positions, chunk_size=chunk_size, row_positions=row_positions)
        return self._log_probs(model, resid, dtype)

    def _log_probs(self, model, resid: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or resid.dtype
        with torch.no_grad():  # resid [K, B, P, d] -> [K, B, P, V]
            return torch.stack([F.log_softmax(self.forward(resid[k], k, model).to(dtype), -1) for k in range(len(resid))])

    def kl_to_final(self, model, input_ids: torch.Tensor, positions=None) -> torch.Tensor:
        """Mean over batch and positions (all, or `positions`) of KL(model's distribution ‖ lens
        distribution) per layer -> [K] (nats)."""
        model = self._model(model)
        self.check_model(model)
        resid, logits = residuals(model, input_ids, positions, return_logits=True)
        lp = self._log_probs(model, resid)  # [K, B, P, V]
        final = F.log_softmax(logits.detach().to(lp.dtype), -1)  # [B, P, V]
        return (final.exp() * (final - lp)).sum(-1).mean((1, 2))


class LogitLens(Lens):
    """The logit lens: norm_f and lm_head applied directly to each layer's residual."""

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h


def logit_lens(model, input_ids: torch.Tensor, positions=None, chunk_size: int | None = None,
               lengths=None) -> torch.Tensor:
    """Logit-lens log-probs [n_layers + 1, B, L or len(positions), V]; layer n_layers = the model's output.
    A long prompt runs in pieces of `chunk_size` tokens with the state carried.

    lengths: each row's real length in a right-padded batch (`model.to_tokens(texts,
    return_lengths=True)`); then `positions` is one int (default −1) counted in each row's own tokens
    (−1: each row's last real token) -> [n_layers + 1, B, 1, V], exact for a causal model."""
    if lengths is None:
        return LogitLens(model).log_probs(model, input_ids, positions, chunk_size=chunk_size)
    return LogitLens(model).log_probs(model, input_ids, chunk_size=chunk_size,
                                      row_positions=row_positions(input_ids, lengths, positions))


def row_positions(input_ids, lengths, position=None) -> list[int]:
    """One position per row of a right-padded batch: `position` (an int, default −1; negative counts
    from each row's own end) within each row's real `lengths`."""
    rows = [len(r) for r in unpad(input_ids, lengths)]
    position = -1 if position is None else position
    if isinstance(position, bool) or not isinstance(position, int):
        raise DiffMambaError(f"with lengths=, positions is one int counted in each row's own tokens, got {position!r}")
    out = [k + position if position < 0 else position for k in rows]
    bad = next((i for i, (p, k) in enumerate(zip(out, rows)) if not 0 <= p < k), None)
    if bad is not None:
        raise DiffMambaError(f"position {position} is out of range for row {bad} of {rows[bad]} tokens")
    return out


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


def weights_fingerprint(model) -> dict:
    """What a saved lens records of the weights it was fitted to: a sha256 of every tensor's bytes (in
    the model's dtype), the dtype, and per tensor its mean |w| and std (float64), which survive a cast
    to another dtype. See `fingerprint_matches`."""
    digest = hashlib.sha256()
    stats = {}
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        x = t.double()
        stats[name] = [round(float(x.abs().mean()), 8), round(float(x.std()) if x.numel() > 1 else 0.0, 8)]
    return {"sha256": digest.hexdigest(), "dtype": str(model.dtype).removeprefix("torch."), "stats": stats}


def fingerprint_matches(saved: dict, model, rtol: float = 1e-2) -> bool:
    """Whether a recorded fingerprint is this model's: the same bytes, or (when the model was cast to
    another dtype) the same tensors with per-tensor statistics within `rtol`."""
    now = weights_fingerprint(model)
    if saved.get("sha256") == now["sha256"]:
        return True
    if saved.get("dtype") == now["dtype"] or set(saved.get("stats", {})) != set(now["stats"]):
        return False
    return all(abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12) for name, pair in now["stats"].items()
               for a, b in zip(pair, saved["stats"][name]))


class TunedLens(Lens):
    """Tuned lens: at each translated layer k an affine translator h -> h + A_k h + b_k (`nn.Linear(d, d)`
    initialised to zero, so at init it is the logit lens); other layers are the identity. By default
    layers 0..n_layers − 1 are translated and layer n_layers (the model's output) is not. Trained with
    `lens_training.train_tuned_lens(model, data, ...)` to minimise KL(final distribution ‖ lens
    distribution); saved next to a checkpoint with `save(dir)` and read back with
    `TunedLens.load(dir, model)`, which also reads lenses saved by the tuned-lens package.
    A saved lens records a fingerprint of the weights it was fitted to and refuses other weights.
    """

    def __init__(self, model, dtype: torch.dtype = torch.float32, layers: Sequence[int] | None = None):
        super().__init__(model)
        self.n_layers = model.cfg.n_layers
        self.d_model = model.cfg.d_model
        self.arch = model.cfg.arch
        self.layers = list(range(self.n_layers)) if layers is None else [int(k) for k in layers]  # translated layers
        if any(not 0 <= k <= self.n_layers for k in self.layers) or len(set(self.layers)) != len(self.layers):
            raise DiffMambaError(f"tuned-lens layers {self.layers} must be distinct lens layers 0..{self.n_layers}")
        self._slot = {k: i for i, k in enumerate(self.layers)}
        self.train_config: LensTrainConfig | None = None
        self.history: list[float] = []  # training loss per step
        self.evaluation: list[dict] | None = None  # per-layer held-out KL (lens_training.evaluate_lens)
        self.translators = nn.ModuleList(nn.Linear(self.d_model, self.d_model) for _ in self.layers)
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.translators.to(device=model.device, dtype=dtype)
        self.translators.requires_grad_(False)

    def translator(self, layer: int) -> nn.Linear | None:
        """The translator of lens layer `layer`, or None where the lens is the identity."""
        slot = self._slot.get(layer)
        return None if slot is None else self.translators[slot]

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        t = self.translator(layer)
        if t is None:
            return h
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
        """Write tuned_lens.safetensors (translator weights) and tuned_lens.json (sizes, translated
        layers, the fingerprint of the bound model's weights, training and evaluation) into `directory`."""
        from safetensors.torch import save_file

        d = Path(directory)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.translators.state_dict().items()}
        write_atomic(d / LENS_WEIGHTS, write=lambda tmp: save_file(weights, str(tmp)))
        meta = {
            "format": "diffmamba_interp.TunedLens",
            "version": 2,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "arch": self.arch,
            "dtype": str(self.translators[0].weight.dtype).removeprefix("torch.") if self.layers else "float32",
            "layers": self.layers,
            "identity_layers": [k for k in range(self.n_layers + 1) if k not in self._slot],
            "fingerprint": weights_fingerprint(self.model) if self.model is not None else None,
            "train": asdict(self.train_config) if self.train_config else None,
            "evaluation": self.evaluation,
        }
        write_atomic(d / LENS_CONFIG, json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory, model, check_fingerprint: bool = True) -> "TunedLens":
        """Read a tuned lens for `model` from `directory`: ours (tuned_lens.json + .safetensors) or one
        saved by the tuned-lens package (config.json + params.pt, see `load_tuned_lens_package`).
        A one-line DiffMambaError naming the file when it is absent, unreadable, corrupt, has unknown
        keys or non-finite weights, when its sizes do not match the model, or when it records a
        fingerprint of other weights (check_fingerprint=False skips that check)."""
        import os
        from dataclasses import fields as dataclass_fields

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..files import path_problem

        d = Path(directory)
        cfg_path, w_path = d / LENS_CONFIG, d / LENS_WEIGHTS
        if not os.path.lexists(cfg_path) or not os.path.lexists(w_path):
            if is_tuned_lens_package(d):
                return cls.load_tuned_lens_package(d, model)
            raise DiffMambaError(
                f"no tuned lens in {d} (expected {LENS_CONFIG} and {LENS_WEIGHTS}); train one with "
                "`diffmamba-interp lens-train --ckpt DIR` (or analysis.lens_training.train_tuned_lens)"
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
        known = {"format", "version", "n_layers", "d_model", "arch", "dtype", "identity_layers", "train", "layers",
                 "fingerprint", "evaluation"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise DiffMambaError(f"{cfg_path}: unknown key{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(map(repr, unknown))} (a tuned-lens config has {', '.join(sorted(known))})")
        for key in ("n_layers", "d_model"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DiffMambaError(f"{cfg_path}: {key!r} must be a whole number, got {value!r}")
        n_layers, d_model = meta["n_layers"], meta["d_model"]
        layers = meta.get("layers", list(range(n_layers)))
        if not isinstance(layers, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
            raise DiffMambaError(f"{cfg_path}: 'layers' must be a list of lens layers, got {layers!r}")
        cfg = model.cfg
        if (n_layers, d_model) != (cfg.n_layers, cfg.d_model):
            raise DiffMambaError(
                f"tuned lens in {d} is for n_layers={n_layers}, d_model={d_model} but the model has "
                f"n_layers={cfg.n_layers}, d_model={cfg.d_model}"
            )
        saved = meta.get("fingerprint")
        if check_fingerprint and saved and not fingerprint_matches(saved, model):
            raise DiffMambaError(
                f"the tuned lens in {d} was fitted to other weights (fingerprint {str(saved.get('sha256'))[:12]}…): "
                "retrain it for these weights with `diffmamba-interp lens-train`"
            )
        if check_fingerprint and not saved:
            warnings.warn(f"the tuned lens in {d} records no fingerprint of its model's weights, so it cannot be "
                          "checked against this model; retrain it with `diffmamba-interp lens-train`", stacklevel=2)
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
        lens = cls(model, dtype=dtype, layers=layers)
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
        lens.evaluation = meta.get("evaluation")
        return lens

    @classmethod
    def load_tuned_lens_package(cls, directory, model, layer_offset: int = 1) -> "TunedLens":
        """A lens saved by the tuned-lens package (Belrose et al.; config.json + params.pt, translators
        `{i}.weight` / `{i}.bias` applied as h + T_i(h) to HF `hidden_states[i]`). For Mamba models HF
        `hidden_states` hold no embedding entry, so translator i reads our layer i + `layer_offset`
        (1; pass 0 for a lens fitted on hidden states that start with the embeddings). params.pt is
        read with torch.load(weights_only=True)."""
        d = Path(directory)
        try:
            config = json.loads((d / "config.json").read_text(encoding="utf-8"))
            n, d_model, bias = int(config["num_hidden_layers"]), int(config["d_model"]), bool(config.get("bias", True))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DiffMambaError(f"{d / 'config.json'} is not a tuned-lens package config: {one_line(e)}") from None
        if (n, d_model) != (model.cfg.n_layers, model.cfg.d_model):
            raise DiffMambaError(f"tuned lens in {d} is for num_hidden_layers={n}, d_model={d_model} but the model has "
                                 f"n_layers={model.cfg.n_layers}, d_model={model.cfg.d_model}")
        try:
            state = torch.load(str(d / "params.pt"), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise DiffMambaError(f"{d / 'params.pt'}: not a readable tensor file ({one_line(e)})") from None
        lens = cls(model, layers=[i + layer_offset for i in range(n)])
        if not bias:
            state = {**state, **{f"{i}.bias": torch.zeros(d_model) for i in range(n)}}
        try:
            lens.translators.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError) as e:
            raise DiffMambaError(f"{d / 'params.pt'} does not match the tuned-lens layout: {one_line(e)}") from None
        lens.translators.to(model.device)
        return lens


def is_tuned_lens_package(directory: Path) -> bool:
    """Whether `directory` holds a lens saved by the tuned-lens package (config.json + params.pt)."""
    config = Path(directory) / "config.json"
    if not (config.is_file() and (Path(directory) / "params.pt").is_file()):
        return False
    try:
        return {"num_hidden_layers", "d_model"} <= set(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


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


def has_tuned_lens(model) -> bool:
    """Whether a tuned lens is attached to the model or saved next to its checkpoint."""
    if isinstance(getattr(model, "tuned_lens", None), TunedLens):
        return True
    path = getattr(model, "checkpoint_path", None)
    return path is not None and (Path(path) / LENS_CONFIG).is_file() and (Path(path) / LENS_WEIGHTS).is_file()


def _auto(model) -> Lens:
    """The tuned lens where the model has one (the paper's instrument), else the logit lens."""
    return _tuned(model) if has_tuned_lens(model) else LogitLens(model)


# lens name -> function(model) -> Lens; the CLI's --lens choices and the jobs read this table
LENSES = {"auto": _auto, "logit": LogitLens, "tuned": _tuned}


def lens_name(lens: Lens) -> str:
    """The registry name of a lens object ("logit" / "tuned"), or its class name."""
    return {LogitLens: "logit", TunedLens: "tuned"}.get(type(lens), type(lens).__name__)


def resolve_lens(model, lens) -> Lens:
    """A lens name of `LENSES` ("auto": tuned where the model has one, else logit; "logit"; "tuned") or a
    `Lens` -> a Lens for `model`."""
    if isinstance(lens, Lens):
        lens.check_model(model)
        return lens
    if lens not in LENSES:
        raise DiffMambaError(f"unknown lens {lens!r}; expected one of {', '.join(map(repr, LENSES))} or a Lens")
    return LENSES[lens](model)
