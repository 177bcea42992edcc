"""Reading a checkpoint's weight files: safetensors (single or sharded) or a PyTorch `.bin` read with
`torch.load(weights_only=True)` only. Every failure is a one-line DiffMambaError naming the file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..errors import DiffMambaError, one_line

# the names transformers writes, in transformers' order of preference; the first one present is read
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class NonFiniteWeightWarning(UserWarning):
    """A checkpoint tensor holds NaN or Inf."""


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Warn (NonFiniteWeightWarning, naming file and tensor) for each float tensor holding NaN or Inf."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            warnings.warn(f"{path}: tensor {key} has non-finite values ({n_nan} NaN, {n_inf} Inf)", NonFiniteWeightWarning, stacklevel=2)
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return check_finite(path, load_file(str(path), device="cpu"))
    except SafetensorError as e:
        raise DiffMambaError(f"{path}: not a valid safetensors file, truncated or corrupt ({one_line(e)})") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise DiffMambaError(f"{path}: cannot be read ({e.strerror or one_line(e)})") from None
    except OSError as e:
        raise DiffMambaError(f"{path}: not a valid safetensors file, truncated or corrupt ({one_line(e)})") from None


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict, read with weights_only=True (no arbitrary code from pickles)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise DiffMambaError(f"{path}: cannot be read ({e.strerror or one_line(e)})") from None
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, KeyError...: torch raises many kinds
        if "weights only load failed" in str(e).lower() or "weights_only" in str(e):
            raise DiffMambaError(
                f"{path}: refused: it holds Python objects other than tensors, and .bin files are only read "
                "with torch.load(weights_only=True); convert it to safetensors where you trust it"
            ) from None
        raise DiffMambaError(f"{path}: not a readable PyTorch weights file, truncated or corrupt ({type(e).__name__}: {one_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise DiffMambaError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return check_finite(path, obj)


def read_sharded(index: Path, read_shard: Callable[[Path], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """A sharded checkpoint: an index JSON whose weight_map names each tensor's shard file."""
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DiffMambaError(f"{index}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DiffMambaError(f"{index}: cannot be read ({one_line(e)})") from None
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DiffMambaError(f'{index}: no "weight_map" object naming the shard of each tensor')
    state: dict[str, torch.Tensor] = {}
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise DiffMambaError(f"{index}: names the shard {shard.name}, which is missing from {index.parent}")
        state.update(read_shard(shard))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise DiffMambaError(f"{index}: {len(absent)} tensors it lists are in none of its shards: {', '.join(absent[:3])}")
    return state, shards


def _single(reader):
    return lambda path: (reader(path), [path])


_READERS = {
    "model.safetensors": _single(read_safetensors),
    "model.safetensors.index.json": lambda path: read_sharded(path, read_safetensors),
    "pytorch_model.bin": _single(read_bin),
    "pytorch_model.bin.index.json": lambda path: read_sharded(path, read_bin),
}


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The tensors of a checkpoint directory (keys as stored) and the files they came from.

    Warns (NonFiniteWeightWarning) for every floating-point tensor holding NaN or Inf.
    """
    name = next((n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if name is None:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        found = f"; found {', '.join(others[:4])}, not a name this loader reads" if others else ""
        raise DiffMambaError(f"{directory}: has config.json but no weights (expected {' or '.join(WEIGHT_FILES)}){found}")
    return _READERS[name](directory / name)
