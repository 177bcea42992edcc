"""`load_model` and `load_tokenizer`: a checkpoint directory (or Hugging Face hub id) -> HookedMamba.

Flow: resolve the path (downloading a hub id if it is not a local path) -> read config.json ->
`formats.detect_format` -> `formats.FORMATS[name]` reads config + weights -> the state dict is
renamed with `keys.to_ours` and checked against the model the config builds (strict by default).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import keys
from ..errors import DiffMambaError
from .formats import FORMATS, Checkpoint, detect_format, read_json
from .weights import one_line

log = logging.getLogger(__name__)

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
def resolve_path(path: str | Path) -> Path:
    """A local checkpoint directory; a Hugging Face hub id that is not a local path is downloaded
    with `huggingface_hub.snapshot_download` (or a one-line error saying how to download it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise DiffMambaError(f"{p}: is a file; pass the checkpoint directory holding config.json and the weights")
    text = str(path)
    if not _HUB_ID.match(text) or ".." in text:
        raise DiffMambaError(f"{p}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as e:  # offline, unknown repo, gated, ...: huggingface_hub raises many kinds
        raise DiffMambaError(
            f"{text}: does not exist locally and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {one_line(e, 120)}); download it with "
            f"`huggingface-cli download {text} --local-dir DIR` (or `hf download ...`) and pass DIR"
        ) from None


def _resolve_dtype(dtype: Any, state: dict[str, torch.Tensor]) -> torch.dtype:
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


def _resolve_device(device: Any) -> torch.device:
    try:
        return torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise DiffMambaError(f"invalid device {device!r}: {one_line(e)}") from None


# -- matching a state dict to a model ------------------------------------------------------------
def _untie_if_needed(ckpt: Checkpoint) -> bool:
    """A config that says tied with a stored lm_head that differs from the embedding: trust the
    weights, build the model untied, and warn. Returns whether it untied."""
    ours, _ = keys.to_ours(ckpt.state)
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


def match_state(model: torch.nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Fill the report's missing / unexpected / mismatched lists; return the tensors that fit (our keys)."""
    ours, unknown = keys.to_ours(state)
    origin, _ = keys.to_ours({k: k for k in state})  # our key -> checkpoint key
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)  # tied: the embedding is stored once
        ours.pop("lm_head.weight", None)  # equal to the embedding (checked by _untie_if_needed)
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
def load_model(path: str | Path, device: Any = None, dtype: Any = None, strict: bool = True):
    """Load a checkpoint directory or Hugging Face hub id as a `HookedMamba` in eval mode.

    Formats (`formats.FORMATS`): transformers Mamba / Mamba-2, the paper's Diff-Mamba-2, mamba-ssm
    (state-spaces/mamba-*) and this package's own `save_pretrained` output; weights from
    safetensors (single or sharded) or a `.bin` read with `torch.load(weights_only=True)`.

    device: None -> CPU. dtype: None -> float32; a torch dtype or its name; "auto" -> as stored.
    strict (default): any missing / unexpected key or shape mismatch raises a one-line
    DiffMambaError listing the keys. strict=False loads what fits, leaves the rest at init, logs a
    warning and records the skipped keys in `model.load_report` (a `LoadReport`, always set).
    `model.tokenizer` is the directory's tokenizer when it has tokenizer files, else None.
    """
    from ..model import HookedMamba

    directory = resolve_path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise DiffMambaError(f"{directory}: no config.json, so this is not a checkpoint directory")
    raw = read_json(config_path)
    try:
        fmt = detect_format(raw)
    except DiffMambaError as e:
        raise DiffMambaError(f"{config_path}: {e}") from None
    ckpt = FORMATS[fmt](directory, raw)
    torch_dtype, torch_device = _resolve_dtype(dtype, ckpt.state), _resolve_device(device)
    report = LoadReport(path=directory, format=fmt, files=ckpt.files, untied_lm_head=_untie_if_needed(ckpt))

    model = HookedMamba(ckpt.config)
    fits = match_state(model, ckpt.state, report)
    if not report.ok:
        where = ckpt.files[0] if len(ckpt.files) == 1 else directory
        if strict:
            raise DiffMambaError(
                f"{where}: the weights do not match config.json: {report.summary()} (strict=False loads what fits)"
            )
        log.warning("%s: loaded with strict=False, left at init or ignored: %s", where, report.summary())
    model.load_state_dict(fits, strict=False)
    try:
        model.to(device=torch_device, dtype=torch_dtype)
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a machine without one
        raise DiffMambaError(f"cannot move the model to {torch_device} / {torch_dtype}: {one_line(e)}") from None
    model.eval()
    model.load_report = report
    model.tokenizer = _tokenizer_or_none(directory)
    model.checkpoint_path = str(directory)  # lets lens="tuned" find tuned_lens.* next to the weights
    log.info("loaded %s (%s, %s) from %s", ckpt.config.arch, fmt, torch_dtype, directory)
    return model


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer_or_none(directory: Path):
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
