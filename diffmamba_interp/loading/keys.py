"""Checkpoint key layouts <-> our module paths: a prefix mapping, no weight surgery.

Every supported layout names tensors `backbone.layers.{i}.<our block path>`; only the prefixes of
the embedding, the blocks and the final norm differ from our module paths. Each `formats.Format`
holds a `KeyMap`; all formats known today share `KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _rename(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


@dataclass(frozen=True)
class KeyMap:
    """Prefix tables, the first match wins: `reads` (checkpoint prefix -> ours) and `writes` (ours -> checkpoint)."""

    reads: tuple[tuple[str, str], ...]
    writes: tuple[tuple[str, str], ...]

    def to_ours(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Checkpoint keys -> ours. Returns (renamed, keys with no known prefix)."""
        out, unknown = {}, []
        for k, v in state_dict.items():
            new = _rename(k, self.reads)
            if new is None:
                unknown.append(k)
            else:
                out[new] = v
        return out, unknown

    def to_checkpoint(self, state_dict: dict) -> dict:
        """Our keys -> the checkpoint layout."""
        return {_rename(k, self.writes) or k: v for k, v in state_dict.items()}


# transformers / upstream Diff-Mamba (`backbone.embeddings`) and mamba-ssm (`backbone.embedding`) read;
# the transformers layout written
KEYS = KeyMap(
    reads=(
        ("backbone.embeddings.", "embed."),
        ("backbone.embedding.", "embed."),
        ("backbone.layers.", "blocks."),
        ("backbone.norm_f.", "norm_f."),
        ("lm_head.", "lm_head."),
    ),
    writes=(
        ("embed.", "backbone.embeddings."),
        ("blocks.", "backbone.layers."),
        ("norm_f.", "backbone.norm_f."),
        ("lm_head.", "lm_head."),
    ),
)
