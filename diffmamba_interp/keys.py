"""Checkpoint key layouts <-> our module paths: a prefix mapping, no weight surgery (SPEC §2)."""

from __future__ import annotations

import torch

# checkpoint prefix -> our module path prefix; the first match wins
_PREFIXES_IN = (
    ("backbone.embeddings.", "embed."),  # transformers
    ("backbone.embedding.", "embed."),  # mamba-ssm (singular)
    ("backbone.layers.", "blocks."),
    ("backbone.norm_f.", "norm_f."),
    ("lm_head.", "lm_head."),
)
_PREFIXES_OUT = (
    ("embed.", "backbone.embeddings."),
    ("blocks.", "backbone.layers."),
    ("norm_f.", "backbone.norm_f."),
    ("lm_head.", "lm_head."),
)


def _rename(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def to_ours(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint keys -> ours. Returns (renamed, keys with no known prefix)."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        new = _rename(k, _PREFIXES_IN)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    return out, unknown


def to_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> the transformers / upstream Diff-Mamba layout."""
    return {_rename(k, _PREFIXES_OUT) or k: v for k, v in state_dict.items()}
