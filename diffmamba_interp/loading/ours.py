"""This package's own config.json, for architectures with no transformers layout (diffmamba1, diffs6):
{"diffmamba_interp": {"format_version": 1, "config": MambaConfig.to_dict()}}.
"""

from __future__ import annotations

from typing import Any

from ..config import MambaConfig
from ..errors import DiffMambaError
from .hf import encode_float, read_limit

MARKER = "diffmamba_interp"  # top-level config.json key of our own format
MARKER_VERSION = 1


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
        d["time_step_limit"] = read_limit(d["time_step_limit"])
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
