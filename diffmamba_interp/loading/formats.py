"""Checkpoint formats: one `Format` record per format (recognise a config.json, read it into a
`MambaConfig`, write one, map the tensor keys), in the registry `FORMATS`. Adding a format = one
record here (and its config reader/writer in a file of its own).

| name                  | recognised by                                      | config        |
|-----------------------|----------------------------------------------------|---------------|
| `diffmamba-interp`    | a top-level `"diffmamba_interp"` marker (ours)      | ours.py       |
| `diffmamba2`          | `model_type: "mamba2"` and `diffmamba: true`       | hf.py         |
| `transformers-mamba2` | `model_type: "mamba2"`                             | hf.py         |
| `transformers-mamba`  | `model_type: "mamba"`                              | hf.py         |
| `mamba-ssm`           | no `model_type`; `d_model` / `n_layer` / `ssm_cfg` | mamba_ssm.py  |

Which format an architecture is saved in is its `ArchSpec.save_format` (archs.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import MambaConfig
from ..errors import DiffMambaError
from .hf import read_hf_config, write_hf_config
from .keys import KEYS, KeyMap
from .mamba_ssm import mamba_ssm_config
from .ours import MARKER, ours_config, ours_marker


@dataclass(frozen=True)
class Format:
    """A checkpoint format: how to recognise its config.json, read and write it, and map its keys."""

    name: str
    recognise: Callable[[dict[str, Any]], bool]
    read_config: Callable[[dict[str, Any]], MambaConfig]
    write_config: Optional[Callable[[MambaConfig], dict[str, Any]]] = None  # None: read-only
    keys: KeyMap = KEYS
    writes_dtype: bool = False  # the written config.json records the weights' dtype (transformers' "dtype")

    def config(self, raw: dict[str, Any], path: Path) -> MambaConfig:
        """Read the config.json at `path` (already parsed as `raw`), every problem naming the file."""
        try:
            return self.read_config(raw)
        except DiffMambaError as e:
            raise DiffMambaError(f"{path}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:  # a field of the wrong type that a reader did not guard
            raise DiffMambaError(f"{path}: config has a field of the wrong type or value ({e})") from None


# in detection order: the first format that recognises a config.json wins
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("diffmamba-interp", lambda d: MARKER in d, ours_config, ours_marker),
    Format("diffmamba2", lambda d: d.get("model_type") == "mamba2" and bool(d.get("diffmamba")), read_hf_config,
           write_hf_config, writes_dtype=True),
    Format("transformers-mamba2", lambda d: d.get("model_type") == "mamba2", read_hf_config, write_hf_config,
           writes_dtype=True),
    Format("transformers-mamba", lambda d: d.get("model_type") == "mamba", read_hf_config, write_hf_config,
           writes_dtype=True),
    Format("mamba-ssm", lambda d: "model_type" not in d and bool({"d_model", "n_layer", "ssm_cfg"} & d.keys()),
           mamba_ssm_config),
)}


def detect_format(raw: dict[str, Any]) -> str:
    """The name of the checkpoint format a config.json is written in (a key of `FORMATS`)."""
    for name, fmt in FORMATS.items():
        if fmt.recognise(raw):
            return name
    if "model_type" in raw:
        raise DiffMambaError(
            f"unknown model_type {raw['model_type']!r} (supported: 'mamba', 'mamba2', and 'mamba2' with diffmamba: true)"
        )
    raise DiffMambaError(
        f'not a recognised checkpoint config: no model_type (transformers), no d_model/n_layer (mamba-ssm), no "{MARKER}" marker'
    )


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
