"""Checkpoint formats (SPEC §2): recognising a config.json and reading it into a `MambaConfig`.

`detect_format(raw)` names the format; `FORMATS[name](directory, raw)` loads the checkpoint:
the format's config reader followed by the shared weight reader (`weights.read_weights`).

| name                  | recognised by                                   | config reader             |
|-----------------------|-------------------------------------------------|---------------------------|
| `diffmamba-interp`    | a top-level `"diffmamba_interp"` marker (ours)   | `MambaConfig.from_dict`   |
| `diffmamba2`          | `model_type: "mamba2"` and `diffmamba: true`    | `MambaConfig.from_hf_dict`|
| `transformers-mamba2` | `model_type: "mamba2"`                          | `MambaConfig.from_hf_dict`|
| `transformers-mamba`  | `model_type: "mamba"`                           | `MambaConfig.from_hf_dict`|
| `mamba-ssm`           | no `model_type`; `d_model` / `n_layer` / `ssm_cfg` | `mamba_ssm_config`     |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import MambaConfig
from ..errors import DiffMambaError
from .weights import read_weights

MARKER = "diffmamba_interp"  # top-level config.json key of our own format
MARKER_VERSION = 1


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its config and its tensors, keys in the checkpoint's own layout."""

    format: str
    config: MambaConfig
    state: dict[str, torch.Tensor]
    files: list[Path] = field(default_factory=list)


# -- config.json ---------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line DiffMambaError naming the file and where it broke."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DiffMambaError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise DiffMambaError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        value = json.loads(text)  # Python's json reads Infinity / NaN, as transformers may write them
    except json.JSONDecodeError as e:
        raise DiffMambaError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise DiffMambaError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


def encode_float(x: float) -> Any:
    """Infinity / NaN the way transformers writes them ({"__float__": "Infinity"}), valid strict JSON."""
    return x if math.isfinite(x) else {"__float__": str(x).replace("inf", "Infinity").replace("nan", "NaN")}


def decode_float(x: Any) -> float:
    return float(x["__float__"]) if isinstance(x, dict) and "__float__" in x else float(x)


# -- config readers ------------------------------------------------------------------------------
def ours_config(raw: dict[str, Any]) -> MambaConfig:
    """Our own config.json: {"diffmamba_interp": {"format_version": 1, "config": MambaConfig.to_dict()}}."""
    marker = raw[MARKER]
    if not isinstance(marker, dict) or not isinstance(marker.get("config"), dict):
        raise DiffMambaError(f'"{MARKER}" must be an object with a "config" object')
    version = marker.get("format_version", MARKER_VERSION)
    if version != MARKER_VERSION:
        raise DiffMambaError(f'"{MARKER}" format_version {version!r} is not supported (this version reads {MARKER_VERSION})')
    d = dict(marker["config"])
    missing = [k for k in ("arch", "d_model", "n_layers", "vocab_size") if k not in d]
    if missing:
        raise DiffMambaError(f"config lacks the field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if "time_step_limit" in d:
        try:
            lo, hi = d["time_step_limit"]
            d["time_step_limit"] = (decode_float(lo), decode_float(hi))
        except (TypeError, ValueError, KeyError):
            raise DiffMambaError(f"time_step_limit {d['time_step_limit']!r} is not a pair of numbers") from None
    try:
        return MambaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        if isinstance(e, DiffMambaError):
            raise
        raise DiffMambaError(f"config has a field of the wrong type: {e}") from None


def ours_marker(cfg: MambaConfig) -> dict[str, Any]:
    """The config.json that `ours_config` reads back to `cfg` (strict JSON: no bare Infinity)."""
    d = cfg.to_dict()
    d["time_step_limit"] = [encode_float(v) for v in cfg.time_step_limit]
    return {MARKER: {"format_version": MARKER_VERSION, "config": d}}


# mamba-ssm defaults (mamba_ssm/modules/mamba_simple.py, mamba2.py; models/config_mamba.py)
_SSM_DEFAULTS = {
    "Mamba1": dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False),
    "Mamba2": dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, conv_bias=True,
                   bias=False, rmsnorm=True, norm_before_gate=False, dt_limit=(0.0, math.inf), d_ssm=None),
}


def mamba_ssm_config(raw: dict[str, Any]) -> MambaConfig:
    """A mamba-ssm (state-spaces/mamba-*) config.json: d_model, n_layer, vocab_size, ssm_cfg, ...

    The model's vocabulary is vocab_size rounded up to pad_vocab_size_multiple (default 8), as
    mamba-ssm's MambaLMHeadModel builds it; the logits keep the padded vocabulary.
    """
    missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in raw]
    if missing:
        raise DiffMambaError(f"mamba-ssm config lacks the field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    ssm_cfg = raw.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise DiffMambaError(f"ssm_cfg must be an object, got {ssm_cfg!r}")
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in _SSM_DEFAULTS:
        raise DiffMambaError(f"ssm_cfg.layer {layer!r} is not supported (expected 'Mamba1' or 'Mamba2')")
    s = {**_SSM_DEFAULTS[layer], **ssm_cfg}
    unsupported = {
        "rms_norm": raw.get("rms_norm", True) is not True and "LayerNorm blocks (rms_norm false)",
        "d_intermediate": bool(raw.get("d_intermediate", 0)) and "MLP blocks (d_intermediate > 0)",
        "attn_layer_idx": bool(raw.get("attn_layer_idx")) and "attention layers (attn_layer_idx)",
        "rmsnorm": layer == "Mamba2" and s["rmsnorm"] is not True and "a Mamba-2 mixer without its gated norm",
        "norm_before_gate": layer == "Mamba2" and bool(s["norm_before_gate"]) and "norm_before_gate true",
    }
    for what in unsupported.values():
        if what:
            raise DiffMambaError(f"mamba-ssm checkpoints with {what} are not supported")
    try:
        d_model, vocab = int(raw["d_model"]), int(raw["vocab_size"])
        multiple = int(raw.get("pad_vocab_size_multiple", 8))
        if multiple <= 0:
            raise ValueError(f"pad_vocab_size_multiple must be positive, got {multiple}")
        kw: dict[str, Any] = dict(
            d_model=d_model,
            n_layers=int(raw["n_layer"]),
            vocab_size=vocab + (-vocab) % multiple,
            pad_vocab_size_multiple=multiple,
            d_state=int(s["d_state"]),
            d_conv=int(s["d_conv"]),
            expand=int(s["expand"]),
            conv_bias=bool(s["conv_bias"]),
            bias=bool(s["bias"]),
            norm_eps=float(raw.get("norm_epsilon", 1e-5)),
            tie_embeddings=bool(raw.get("tie_embeddings", True)),
            residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        )
        if layer == "Mamba1":
            kw["arch"] = "mamba1"
            kw["dt_rank"] = math.ceil(d_model / 16) if s["dt_rank"] in (None, "auto") else int(s["dt_rank"])
        else:
            kw["arch"] = "mamba2"
            kw["head_dim"] = int(s["headdim"])
            kw["n_groups"] = int(s["ngroups"])
            kw["chunk_size"] = int(s["chunk_size"])
            lo, hi = s["dt_limit"]
            kw["time_step_limit"] = (decode_float(lo), decode_float(hi))
            if s["d_ssm"] is not None and int(s["d_ssm"]) != kw["expand"] * d_model:
                raise DiffMambaError("mamba-ssm checkpoints with an MLP branch in the mixer (d_ssm < d_inner) are not supported")
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, DiffMambaError):
            raise
        raise DiffMambaError(f"mamba-ssm config has a field of the wrong type: {e}") from None
    return MambaConfig(**kw)


# -- detection and the registry ------------------------------------------------------------------
# (format name, predicate on the raw config.json); the first match wins
_DETECT: tuple[tuple[str, Callable[[dict], bool]], ...] = (
    ("diffmamba-interp", lambda d: MARKER in d),
    ("diffmamba2", lambda d: d.get("model_type") == "mamba2" and bool(d.get("diffmamba"))),
    ("transformers-mamba2", lambda d: d.get("model_type") == "mamba2"),
    ("transformers-mamba", lambda d: d.get("model_type") == "mamba"),
    ("mamba-ssm", lambda d: "model_type" not in d and bool({"d_model", "n_layer", "ssm_cfg"} & d.keys())),
)


def detect_format(raw: dict[str, Any]) -> str:
    """The name of the checkpoint format a config.json is written in (a key of `FORMATS`)."""
    for name, matches in _DETECT:
        if matches(raw):
            return name
    if "model_type" in raw:
        raise DiffMambaError(
            f"unknown model_type {raw['model_type']!r} (supported: 'mamba', 'mamba2', and 'mamba2' with diffmamba: true)"
        )
    raise DiffMambaError(
        f'not a recognised checkpoint config: no model_type (transformers), no d_model/n_layer (mamba-ssm), no "{MARKER}" marker'
    )


def _loader(read_config: Callable[[dict[str, Any]], MambaConfig], name: str):
    def load(directory: Path, raw: dict[str, Any]) -> Checkpoint:
        try:
            cfg = read_config(raw)
        except DiffMambaError as e:
            raise DiffMambaError(f"{directory / 'config.json'}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:  # a field of the wrong type that a reader did not guard
            raise DiffMambaError(f"{directory / 'config.json'}: config has a field of the wrong type or value ({e})") from None
        state, files = read_weights(directory)
        return Checkpoint(name, cfg, state, files)

    load.__name__ = f"load_{name.replace('-', '_')}"
    load.__doc__ = f"Read a {name} checkpoint directory: its config.json, then its weight files."
    return load


# format name -> loader(directory, raw config.json) -> Checkpoint
FORMATS: dict[str, Callable[[Path, dict[str, Any]], Checkpoint]] = {
    "diffmamba-interp": _loader(ours_config, "diffmamba-interp"),
    "diffmamba2": _loader(MambaConfig.from_hf_dict, "diffmamba2"),
    "transformers-mamba2": _loader(MambaConfig.from_hf_dict, "transformers-mamba2"),
    "transformers-mamba": _loader(MambaConfig.from_hf_dict, "transformers-mamba"),
    "mamba-ssm": _loader(mamba_ssm_config, "mamba-ssm"),
}
