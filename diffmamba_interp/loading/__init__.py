"""Checkpoint files: every supported format read into (config, tensors), and written back.

- `read_checkpoint(path)` -> `Checkpoint` (format, `MambaConfig`, tensors in the checkpoint's
  layout, files); the format is detected from config.json and looked up in the registry
  `FORMATS` (format name -> `Format` record), see `formats.py`.
- `match_state` / `LoadReport`: which tensors fit a model's parameters and which do not.
- `save_pretrained(model, path)`: config.json + model.safetensors (+ tokenizer files).
- `load_tokenizer(path)`: the directory's tokenizer via `transformers.AutoTokenizer`.

Building a model from a checkpoint is `HookedMamba.from_pretrained` / `diffmamba_interp.load_model`
(model.py): this package never imports the model. Every bad input is a one-line `DiffMambaError`
naming the file and the problem: config fields are typed (fields.py: no "false" for false, no true
for 1, no 64.7 for 64), weights must be finite floating point, shard names stay inside the
checkpoint directory, `.bin` files are read with `torch.load(weights_only=True)` and no remote code
is ever run; a path is sent to the Hugging Face hub only when it looks like "owner/name" and no
local path of that name exists.
"""

from .checkpoint import Checkpoint, LoadReport, load_tokenizer, match_state, read_checkpoint, resolve_path
from .formats import FORMATS, Format, detect_format
from .save import save_pretrained
from .weights import NonFiniteWeightWarning, read_weights

__all__ = [
    "FORMATS", "Format", "Checkpoint", "LoadReport", "NonFiniteWeightWarning", "detect_format", "load_tokenizer",
    "match_state", "read_checkpoint", "read_weights", "resolve_path", "save_pretrained",
]
