"""`save_pretrained`: config.json + model.safetensors (+ tokenizer files), readable by `load_model`.

Each architecture is written in its `ArchSpec.save_format` (archs.py): mamba1 / mamba2 / diffmamba2
in the transformers / upstream Diff-Mamba layout, so transformers' MambaForCausalLM /
Mamba2ForCausalLM load the plain ones; diffmamba1, diffs6 and diffs6mamba2, which have no such layout, in our own
marker format (ours.py). Takes any model with `cfg`, `state_dict()`, `embed`, `lm_head`, `dtype`
and `tokenizer` (a HookedMamba); it does not import the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import DiffMambaError
from ..files import path_problem, write_atomic
from .formats import FORMATS


def _is_tied(model) -> bool:
    """Whether lm_head really is the embedding (same storage, or equal values)."""
    emb, lm = model.embed.weight, model.lm_head.weight
    return lm is emb or (lm.shape == emb.shape and lm.data_ptr() == emb.data_ptr()) or (
        lm.shape == emb.shape and bool(torch.equal(lm.detach(), emb.detach()))
    )


def save_pretrained(model, path: str | Path) -> None:
    """Write `model` to the directory `path` (created if needed) so that `load_model(path)` returns
    an equal model: config.json, model.safetensors (contiguous tensors; a tied lm_head is written
    once, as the embedding, as transformers does) and the tokenizer files when `model.tokenizer` is set.
    """
    directory = Path(path).expanduser()
    problem = path_problem(directory, "dir")
    if problem and os.path.lexists(directory):
        raise DiffMambaError(f"{directory}: {problem}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffMambaError(f"{directory}: cannot create the directory ({e.strerror or e})") from None

    cfg = model.cfg
    tied = cfg.tie_embeddings and _is_tied(model)
    if cfg.tie_embeddings and not tied:  # untied after construction: save what the model computes
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    dtype_name = str(model.dtype).removeprefix("torch.")
    fmt = FORMATS[cfg.spec.save_format]
    config = fmt.write_config(cfg)
    if fmt.writes_dtype:
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name

    state = fmt.keys.to_checkpoint(model.state_dict())
    if tied:
        state.pop("lm_head.weight", None)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    from safetensors.torch import save_file

    # each file through a temporary file and a rename (files.write_atomic), with the umask's mode
    write_atomic(directory / "model.safetensors", write=lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_atomic(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "tokenizer", None) is not None:
        with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=directory) as staging:
            model.tokenizer.save_pretrained(staging)
            for f in sorted(Path(staging).iterdir()):
                if f.is_file():
                    write_atomic(directory / f.name, f.read_bytes())
