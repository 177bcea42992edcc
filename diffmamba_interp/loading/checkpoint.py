"""Reading a checkpoint directory (or Hugging Face hub id): `read_checkpoint` -> `Checkpoint` (format,
config, tensors, files), `match_state` (which tensors fit a model, in a `LoadReport`), and the
tokenizer. Building the model from these is `HookedMamba.from_pretrained` (model.py): loading knows
formats, the model knows modules, and the dependency points one way (model -> loading).

Flow: resolve the path (a local directory; an "owner/name" that is no local path is downloaded) -> read config.json ->
`formats.detect_format` -> the `Format` reads the config -> `weights.read_weights` reads the
tensors -> `match_state` renames them with the format's `KeyMap` and checks them against the
model's parameters (strict by default).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import MambaConfig
from ..errors import DiffMambaError, one_line
from ..files import path_problem
from .formats import FORMATS, detect_format, read_json
from .weights import read_weights


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt"]
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "double": torch.float64,
}


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its config and its tensors, keys in the checkpoint's own layout."""

    format: str
    config: MambaConfig
    state: dict[str, torch.Tensor]
    files: list[Path] = field(default_factory=list)
    directory: Path | None = None

    @property
    def keys(self):
        return FORMATS[self.format].keys


@dataclass
class LoadReport:
    """What `load_model` did: the format, the files read, and every key it could not load.

    Keys are named in the checkpoint's layout (backbone.layers.3.mixer.A_log). A strict load
    succeeds only when missing, unexpected and mismatched are all empty.
    """

    path: Path
    format: str
    files: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model has it, the checkpoint does not
    unexpected: list[str] = field(default_factory=list)  # the checkpoint has it, the model does not
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    untied_lm_head: bool = False  # config said tied, but the stored lm_head differs from the embedding

    @property
    def skipped(self) -> list[str]:
        """Every checkpoint or model key that was not loaded."""
        return [*self.missing, *self.unexpected, *(k for k, _, _ in self.mismatched)]

    @property
    def ok(self) -> bool:
        return not self.skipped

    def summary(self) -> str:
        """One line: the problems, each list shortened to its first few keys and a count."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys ({_shorten(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys ({_shorten(self.unexpected)})")
        if self.mismatched:
            shapes = [f"{k} {list(a)} in checkpoint vs {list(b)} in model" for k, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} shape mismatches ({_shorten(shapes)})")
        return "; ".join(parts) or "all keys loaded"


def _shorten(items: list[str], first: int = 3) -> str:
    head = ", ".join(items[:first])
    return head if len(items) <= first else f"{head}, … and {len(items) - first} more"


# -- paths ---------------------------------------------------------------------------------------
def looks_like_hub_id(text: str) -> bool:
    """"owner/name" (one slash, hub-legal characters, no leading "." or "~", no ".."), and no local
    path of that name or of its owner part exists: only then is an argument sent to the hub."""
    if not _HUB_ID.match(text) or ".." in text or text.startswith((".", "~")):
        return False
    owner = text.split("/", 1)[0]
    return not os.path.lexists(text) and not os.path.lexists(owner)


def resolve_path(path: str | Path) -> Path:
    """A local checkpoint directory. An argument is a Hugging Face hub id only when it looks like one
    ("owner/name") and no local path of that name (or of its owner part) exists; it is then
    downloaded with `huggingface_hub.snapshot_download` (or a one-line error saying how to download
    it). Anything else that is not a directory is a one-line error saying what it is: "no such
    directory", "is a file", "is a symlink loop", ... (never a trip to the hub)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise DiffMambaError(f"a checkpoint path must be a string or a Path, got {type(path).__name__}")
    text = os.fspath(path)
    if not text.strip():
        raise DiffMambaError("an empty checkpoint path; pass a checkpoint directory")
    p = Path(text).expanduser()
    problem = path_problem(p, "dir")
    if problem is None:
        return p
    if problem == "is a file, not a directory":
        raise DiffMambaError(f"{p}: is a file; pass the checkpoint directory holding config.json and the weights")
    if isinstance(path, os.PathLike) or not looks_like_hub_id(text):
        raise DiffMambaError(f"{p}: {problem}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as e:  # offline, unknown repo, gated, ...: huggingface_hub raises many kinds
        raise DiffMambaError(
            f"{text}: no such directory, and it could not be downloaded as a Hugging Face hub id "
            f"({type(e).__name__}: {one_line(e, 120)}); download it with "
            f"`huggingface-cli download {text} --local-dir DIR` (or `hf download ...`) and pass DIR"
        ) from None


def resolve_dtype(dtype: Any, state: dict[str, torch.Tensor]) -> torch.dtype:
    """None -> float32 (as transformers' from_pretrained); "auto" -> the checkpoint's float dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise DiffMambaError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name == "auto":
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32
    if name not in _DTYPES:
        raise DiffMambaError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16, float64, auto")
    return _DTYPES[name]


def resolve_device(device: Any) -> torch.device:
    try:
        return torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise DiffMambaError(f"invalid device {device!r}: {one_line(e)}") from None


# -- matching a state dict to a model ------------------------------------------------------------
def untie_if_needed(ckpt: Checkpoint) -> bool:
    """A config that says tied with a stored lm_head that differs from the embedding: trust the
    weights, build the model untied, and warn. Returns whether it untied."""
    ours, _ = ckpt.keys.to_ours(ckpt.state)
    lm, emb = ours.get("lm_head.weight"), ours.get("embed.weight")
    if not ckpt.config.tie_embeddings or lm is None or emb is None:
        return False
    if lm.shape == emb.shape and torch.equal(lm, emb.to(lm.dtype)):
        return False
    ckpt.config = dataclasses.replace(ckpt.config, tie_embeddings=False)
    warnings.warn(
        f"{ckpt.files[0].parent}: config says the lm_head is tied to the embedding, but the stored lm_head.weight "
        "differs from it; loading them untied, as stored",
        stacklevel=3,
    )
    return True


def match_state(expected: dict[str, torch.Size], ckpt: Checkpoint, report: LoadReport) -> dict[str, torch.Tensor]:
    """Fill the report's missing / unexpected / mismatched lists; return the tensors that fit (our keys).

    expected: the model's state-dict shapes (our keys; a tied lm_head is not expected).
    """
    keys = ckpt.keys
    ours, unknown = keys.to_ours(ckpt.state)
    origin, _ = keys.to_ours({k: k for k in ckpt.state})  # our key -> checkpoint key
    expected = dict(expected)
    if ckpt.config.tie_embeddings:
        expected.pop("lm_head.weight", None)  # tied: the embedding is stored once
        ours.pop("lm_head.weight", None)  # equal to the embedding (checked by untie_if_needed)
    fits = {}
    for k, t in ours.items():
        if k not in expected:
            report.unexpected.append(origin[k])
        elif tuple(t.shape) != tuple(expected[k]):
            report.mismatched.append((origin[k], tuple(t.shape), tuple(expected[k])))
        else:
            fits[k] = t
    report.unexpected[:0] = unknown
    report.missing = list(keys.to_checkpoint({k: None for k in expected if k not in ours}))
    return fits


# -- public API ----------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, non_finite: str = "error") -> Checkpoint:
    """Read a checkpoint directory (or hub id): its format, config and tensors, with every problem a
    one-line DiffMambaError naming the file. Weights holding NaN or Inf are refused (non_finite="error",
    the default) or read with a NonFiniteWeightWarning (non_finite="warn")."""
    directory = resolve_path(path)
    config_path = directory / "config.json"
    problem = path_problem(config_path, "file")
    if problem == "no such file":
        raise DiffMambaError(f"{directory}: no config.json, so this is not a checkpoint directory")
    if problem:
        raise DiffMambaError(f"{config_path}: {problem}")
    raw = read_json(config_path)
    try:
        fmt = detect_format(raw)
    except DiffMambaError as e:
        raise DiffMambaError(f"{config_path}: {e}") from None
    cfg = FORMATS[fmt].config(raw, config_path)
    state, files = read_weights(directory, non_finite=non_finite)
    return Checkpoint(fmt, cfg, state, files, directory)


def stored_layers(ckpt: Checkpoint) -> int | None:
    """How many blocks the checkpoint's tensors hold (1 + the largest `blocks.{i}.` index), None if none."""
    ours, _ = ckpt.keys.to_ours(ckpt.state)
    idx = [int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in ours) if m]
    return max(idx) + 1 if idx else None


def check_size(n_params: int, dtype: torch.dtype, where) -> None:
    """Refuse (one-line DiffMambaError) a model whose parameters would not fit in this machine's
    memory, before allocating them."""
    n_bytes = n_params * torch.empty((), dtype=dtype).element_size()
    limit = physical_memory()
    if limit and n_bytes > limit:
        raise DiffMambaError(
            f"{where}: the config describes a model of {n_params:,} parameters ({n_bytes / 2**30:,.1f} GiB in "
            f"{str(dtype).removeprefix('torch.')}), more than this machine's memory ({limit / 2**30:,.1f} GiB)"
        )


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def has_tokenizer_files(directory: Path) -> bool:
    return any(os.path.lexists(directory / name) for name in TOKENIZER_FILES)


def tokenizer_or_none(directory: Path):
    if not has_tokenizer_files(directory):
        return None
    try:
        return load_tokenizer(directory)
    except DiffMambaError as e:
        warnings.warn(f"model loaded without its tokenizer: {e}", stacklevel=3)
        return None


def load_tokenizer(path: str | Path):
    """`transformers.AutoTokenizer.from_pretrained(path)` (no remote code), or a one-line
    DiffMambaError when the directory has no tokenizer files or they cannot be read."""
    directory = resolve_path(path)
    for name in TOKENIZER_FILES:
        problem = os.path.lexists(directory / name) and path_problem(directory / name, "file")
        if problem:
            raise DiffMambaError(f"{directory / name}: {problem}")
    if not has_tokenizer_files(directory):
        raise DiffMambaError(
            f"{directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); pass token ids instead, "
            "or save the base model's tokenizer there (e.g. EleutherAI/gpt-neox-20b for state-spaces/mamba-*)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for bad tokenizer files
        raise DiffMambaError(f"{directory}: the tokenizer files cannot be loaded ({type(e).__name__}: {one_line(e)})") from None
