"""This package's own config.json, for architectures with no transformers layout (diffmamba1, diffs6,
diffs6mamba2):
{"diffmamba_interp": {"format_version": 1, "config": MambaConfig.to_dict()}}.
"""

from __future__ import annotations

from typing import Any

from ..config import MambaConfig
from ..errors import DiffMambaError
from .fields import Fields, read_limit
from .hf import encode_float, read_diff_layers

MARKER = "diffmamba_interp"  # top-level config.json key of our own format
MARKER_VERSION = 1
_INTS = ("d_model", "n_layers", "vocab_size", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size",
         "pad_vocab_size_multiple")
_BOOLS = ("conv_bias", "bias", "tie_embeddings", "residual_in_fp32")


def ours_config(raw: dict[str, Any]) -> MambaConfig:
    """Our own config.json: {"diffmamba_interp": {"format_version": 1, "config": MambaConfig.to_dict()}}."""
    marker = raw[MARKER]
    if not isinstance(marker, dict) or not isinstance(marker.get("config"), dict):
        raise DiffMambaError(f'"{MARKER}" must be an object with a "config" object')
    version = marker.get("format_version", MARKER_VERSION)
    if isinstance(version, bool) or version != MARKER_VERSION:
        raise DiffMambaError(f'"{MARKER}" format_version {version!r} is not supported (this version reads {MARKER_VERSION})')
    d = dict(marker["config"])
    missing = [k for k in ("arch", "d_model", "n_layers", "vocab_size") if k not in d]
    if missing:
        raise DiffMambaError(f"config lacks the field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    f = Fields(d, prefix=f"{MARKER}.config.")
    for name in _INTS:
        if name in d:
            d[name] = f.int(name)
    if d.get("dt_rank") is not None:
        d["dt_rank"] = f.int("dt_rank")
    for name in _BOOLS:
        if name in d:
            d[name] = f.bool(name)
    if "norm_eps" in d:
        d["norm_eps"] = f.float("norm_eps", positive=True)
    if "arch" in d and not isinstance(d["arch"], str):
        f.fail("arch", "an architecture name", d["arch"])
    if "time_step_limit" in d:
        d["time_step_limit"] = read_limit(d["time_step_limit"], f"{MARKER}.config.time_step_limit")
    if "diff_layers" in d:
        d["diff_layers"] = read_diff_layers(d["diff_layers"], f"{MARKER}.config.diff_layers")
    if "extra" in d:
        d["extra"] = f.object("extra")
    return MambaConfig.from_dict(d)


def ours_marker(cfg: MambaConfig) -> dict[str, Any]:
    """The config.json that `ours_config` reads back to `cfg` (strict JSON: no bare Infinity)."""
    d = cfg.to_dict()
    d["time_step_limit"] = [encode_float(v) for v in cfg.time_step_limit]
    return {MARKER: {"format_version": MARKER_VERSION, "config": d}}
