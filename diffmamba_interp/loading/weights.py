"""Reading a checkpoint's weight files: safetensors (single or sharded) or a PyTorch `.bin` read with
`torch.load(weights_only=True)` only. Every failure is a one-line DiffMambaError naming the file.

Weights holding NaN or Inf are refused (a model with them gives all-NaN probabilities, which no
analysis can rank); `read_weights(..., non_finite="warn")` reads them anyway, with a
NonFiniteWeightWarning per tensor, for inspecting a diverged checkpoint. A sharded index may only
name shard files inside its own directory."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable

import torch

from ..errors import DiffMambaError, one_line
from ..files import path_problem
from .fields import show

# the names transformers writes, in transformers' order of preference; the first one present is read
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class NonFiniteWeightWarning(UserWarning):
    """A checkpoint tensor holds NaN or Inf."""


NON_FINITE = ("error", "warn")


def check_finite(path: Path, state: dict[str, torch.Tensor], non_finite: str = "error") -> dict[str, torch.Tensor]:
    """Each float tensor holding NaN or Inf: a DiffMambaError naming file and tensor (non_finite="error",
    the default), or a NonFiniteWeightWarning (non_finite="warn")."""
    if non_finite not in NON_FINITE:
        raise DiffMambaError(f"non_finite must be one of {', '.join(map(repr, NON_FINITE))}, got {non_finite!r}")
    for key, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            msg = f"{path}: tensor {key} has non-finite values ({n_nan} NaN, {n_inf} Inf)"
            if non_finite == "error":
                raise DiffMambaError(f"{msg}; refusing to load weights that give NaN results")
            warnings.warn(msg, NonFiniteWeightWarning, stacklevel=2)
    return state


def check_float(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor must be floating point: a language model's weights are (an int64 or bool tensor
    would be cast silently to float by load_state_dict)."""
    for key, t in state.items():
        if not t.is_floating_point():
            raise DiffMambaError(f"{path}: tensor {key} is stored as {str(t.dtype).removeprefix('torch.')}; "
                                 "model weights must be floating point")
    return state


def _file(path: Path) -> Path:
    """`path` when it is a readable file, else a one-line DiffMambaError saying what it is instead."""
    problem = path_problem(path, "file")
    if problem:
        raise DiffMambaError(f"{path}: {problem}")
    return path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _file(path)
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise DiffMambaError(f"{path}: not a valid safetensors file, truncated or corrupt ({one_line(e)})") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise DiffMambaError(f"{path}: cannot be read ({e.strerror or one_line(e)})") from None
    except OSError as e:
        raise DiffMambaError(f"{path}: not a valid safetensors file, truncated or corrupt ({one_line(e)})") from None


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict, read with weights_only=True (no arbitrary code from pickles)."""
    _file(path)
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
    return obj


def read_sharded(index: Path, read_shard: Callable[[Path], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """A sharded checkpoint: an index JSON whose weight_map names each tensor's shard file (a file
    name relative to the index's directory, never an absolute path or one with '..')."""
    _file(index)
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DiffMambaError(f"{index}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DiffMambaError(f"{index}: cannot be read ({one_line(e)})") from None
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DiffMambaError(f'{index}: no "weight_map" object naming the shard of each tensor')
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise DiffMambaError(f'{index}: "weight_map" entry {key!r} must be a shard file name, got {show(name)}')
        rel = PurePosixPath(name.replace("\\", "/"))
        if rel.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in rel.parts or name.startswith("~"):
            raise DiffMambaError(f'{index}: "weight_map" entry {key!r} names {name!r}, outside the checkpoint '
                                 f"directory; shards must be files in {index.parent}")
    state: dict[str, torch.Tensor] = {}
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        problem = path_problem(shard, "file")
        if problem == "no such file":
            raise DiffMambaError(f"{index}: names the shard {shard.name}, which is missing from {index.parent}")
        if problem:
            raise DiffMambaError(f"{index}: names the shard {shard.name}, which {problem}")
        state.update(read_shard(shard))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise DiffMambaError(f"{index}: {len(absent)} tensors it lists are in none of its shards: {', '.join(absent[:3])}")
    return state, shards


def _checked(reader: Callable[[Path], dict[str, torch.Tensor]], non_finite: str):
    """`reader` followed by the checks of every weight file (floating point; finite unless non_finite="warn")."""
    return lambda path: check_finite(path, check_float(path, reader(path)), non_finite)


def _readers(non_finite: str) -> dict[str, Callable[[Path], tuple[dict[str, torch.Tensor], list[Path]]]]:
    safetensors, pt = _checked(read_safetensors, non_finite), _checked(read_bin, non_finite)
    return {
        "model.safetensors": lambda path: (safetensors(path), [path]),
        "model.safetensors.index.json": lambda path: read_sharded(path, safetensors),
        "pytorch_model.bin": lambda path: (pt(path), [path]),
        "pytorch_model.bin.index.json": lambda path: read_sharded(path, pt),
    }


def read_weights(directory: Path, non_finite: str = "error") -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The tensors of a checkpoint directory (keys as stored) and the files they came from.

    Every tensor must be floating point. A tensor holding NaN or Inf raises (non_finite="error", the
    default) or warns with a NonFiniteWeightWarning (non_finite="warn").
    """
    name = next((n for n in WEIGHT_FILES if os.path.lexists(directory / n)), None)
    if name is None:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        found = f"; found {', '.join(others[:4])}, not a name this loader reads" if others else ""
        raise DiffMambaError(f"{directory}: has config.json but no weights (expected {' or '.join(WEIGHT_FILES)}){found}")
    if non_finite not in NON_FINITE:
        raise DiffMambaError(f"non_finite must be one of {', '.join(map(repr, NON_FINITE))}, got {non_finite!r}")
    return _readers(non_finite)[name](directory / name)
