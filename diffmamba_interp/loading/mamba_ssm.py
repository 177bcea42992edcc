"""The mamba-ssm (state-spaces/mamba-*) config.json: d_model, n_layer, vocab_size, ssm_cfg, ...

The model's vocabulary is vocab_size rounded up to pad_vocab_size_multiple (default 8), as
mamba-ssm's MambaLMHeadModel builds it; the logits keep the padded vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import MambaConfig
from ..errors import DiffMambaError
from .hf import decode_float

# mamba-ssm defaults (mamba_ssm/modules/mamba_simple.py, mamba2.py; models/config_mamba.py)
_SSM_DEFAULTS = {
    "Mamba1": dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False),
    "Mamba2": dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, conv_bias=True,
                   bias=False, rmsnorm=True, norm_before_gate=False, dt_limit=(0.0, math.inf), d_ssm=None),
}


def mamba_ssm_config(raw: dict[str, Any]) -> MambaConfig:
    """A mamba-ssm (state-spaces/mamba-*) config.json: d_model, n_layer, vocab_size, ssm_cfg, ...

    The model's vocabulary is vocab_size rounded up to pad_vocab_size_multiple (default 8), as
    mamba-ssm's MambaLMHeadModel builds it; the logits keep the padded vocabulary.
    """
    missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in raw]
    if missing:
        raise DiffMambaError(f"mamba-ssm config lacks the field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    ssm_cfg = raw.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise DiffMambaError(f"ssm_cfg must be an object, got {ssm_cfg!r}")
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in _SSM_DEFAULTS:
        raise DiffMambaError(f"ssm_cfg.layer {layer!r} is not supported (expected 'Mamba1' or 'Mamba2')")
    s = {**_SSM_DEFAULTS[layer], **ssm_cfg}
    unsupported = {
        "rms_norm": raw.get("rms_norm", True) is not True and "LayerNorm blocks (rms_norm false)",
        "d_intermediate": bool(raw.get("d_intermediate", 0)) and "MLP blocks (d_intermediate > 0)",
        "attn_layer_idx": bool(raw.get("attn_layer_idx")) and "attention layers (attn_layer_idx)",
        "rmsnorm": layer == "Mamba2" and s["rmsnorm"] is not True and "a Mamba-2 mixer without its gated norm",
        "norm_before_gate": layer == "Mamba2" and bool(s["norm_before_gate"]) and "norm_before_gate true",
    }
    for what in unsupported.values():
        if what:
            raise DiffMambaError(f"mamba-ssm checkpoints with {what} are not supported")
    try:
        d_model, vocab = int(raw["d_model"]), int(raw["vocab_size"])
        multiple = int(raw.get("pad_vocab_size_multiple", 8))
        if multiple <= 0:
            raise ValueError(f"pad_vocab_size_multiple must be positive, got {multiple}")
        kw: dict[str, Any] = dict(
            d_model=d_model,
            n_layers=int(raw["n_layer"]),
            vocab_size=vocab + (-vocab) % multiple,
            pad_vocab_size_multiple=multiple,
            d_state=int(s["d_state"]),
            d_conv=int(s["d_conv"]),
            expand=int(s["expand"]),
            conv_bias=bool(s["conv_bias"]),
            bias=bool(s["bias"]),
            norm_eps=float(raw.get("norm_epsilon", 1e-5)),
            tie_embeddings=bool(raw.get("tie_embeddings", True)),
            residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        )
        if layer == "Mamba1":
            kw["arch"] = "mamba1"
            kw["dt_rank"] = math.ceil(d_model / 16) if s["dt_rank"] in (None, "auto") else int(s["dt_rank"])
        else:
            kw["arch"] = "mamba2"
            kw["head_dim"] = int(s["headdim"])
            kw["n_groups"] = int(s["ngroups"])
            kw["chunk_size"] = int(s["chunk_size"])
            lo, hi = s["dt_limit"]
            kw["time_step_limit"] = (decode_float(lo), decode_float(hi))
            if s["d_ssm"] is not None and int(s["d_ssm"]) != kw["expand"] * d_model:
                raise DiffMambaError("mamba-ssm checkpoints with an MLP branch in the mixer (d_ssm < d_inner) are not supported")
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, DiffMambaError):
            raise
        raise DiffMambaError(f"mamba-ssm config has a field of the wrong type: {e}") from None
    return MambaConfig(**kw)
