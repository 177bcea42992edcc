"""Checkpoints: load every supported format, save, convert Mamba -> Diff-Mamba (SPEC §2).

- `load_model(path, device=None, dtype=None, strict=True)` -> HookedMamba (eval mode), from a
  directory or a Hugging Face hub id; the format is detected from config.json and looked up in the
  registry `FORMATS` (format name -> loader function), see `formats.py`.
- `save_pretrained(model, path)`: config.json + model.safetensors (+ tokenizer files).
- `load_tokenizer(path)`: the directory's tokenizer via `transformers.AutoTokenizer`.
- `mamba_to_diffmamba(model, settings)`: the upstream fine-tuning initialisation (SPEC §1).

Every bad input is a one-line `DiffMambaError` naming the file and the problem.
"""

from .convert import mamba_to_diffmamba
from .formats import FORMATS, Checkpoint, detect_format
from .load import LoadReport, load_model, load_tokenizer, resolve_path
from .save import save_pretrained
from .weights import NonFiniteWeightWarning, read_weights

__all__ = [
    "FORMATS", "Checkpoint", "LoadReport", "NonFiniteWeightWarning", "detect_format", "load_model",
    "load_tokenizer", "mamba_to_diffmamba", "read_weights", "resolve_path", "save_pretrained",
]
