"""The mamba-ssm (state-spaces/mamba-*) config.json: d_model, n_layer, vocab_size, ssm_cfg, ...

The model's vocabulary is vocab_size rounded up to pad_vocab_size_multiple (default 8), as
mamba-ssm's MambaLMHeadModel builds it; the logits keep the padded vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import MambaConfig
from ..errors import DiffMambaError
from .fields import Fields, read_limit, show

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
    f = Fields(raw)
    ssm_cfg = f.object("ssm_cfg", {})
    layer = ssm_cfg.get("layer", "Mamba1")
    if not isinstance(layer, str) or layer not in _SSM_DEFAULTS:
        raise DiffMambaError(f"field 'ssm_cfg.layer' {show(layer)} is not supported (expected \"Mamba1\" or \"Mamba2\")")
    s = {**_SSM_DEFAULTS[layer], **ssm_cfg}
    sf = Fields(s, prefix="ssm_cfg.")
    unsupported = {
        "rms_norm": not f.bool("rms_norm", True) and "LayerNorm blocks (rms_norm false)",
        "d_intermediate": f.int("d_intermediate", 0, minimum=0) > 0 and "MLP blocks (d_intermediate > 0)",
        "attn_layer_idx": bool(raw.get("attn_layer_idx")) and "attention layers (attn_layer_idx)",
        "rmsnorm": layer == "Mamba2" and not sf.bool("rmsnorm") and "a Mamba-2 mixer without its gated norm",
        "norm_before_gate": layer == "Mamba2" and sf.bool("norm_before_gate") and "norm_before_gate true",
    }
    for what in unsupported.values():
        if what:
            raise DiffMambaError(f"mamba-ssm checkpoints with {what} are not supported")
    d_model, vocab = f.int("d_model"), f.int("vocab_size")
    multiple = f.int("pad_vocab_size_multiple", 8)
    kw: dict[str, Any] = dict(
        d_model=d_model,
        n_layers=f.int("n_layer"),
        vocab_size=vocab + (-vocab) % multiple,
        pad_vocab_size_multiple=multiple,
        d_state=sf.int("d_state"),
        d_conv=sf.int("d_conv"),
        expand=sf.int("expand"),
        conv_bias=sf.bool("conv_bias"),
        bias=sf.bool("bias"),
        norm_eps=f.float("norm_epsilon", 1e-5, positive=True),
        tie_embeddings=f.bool("tie_embeddings", True),
        residual_in_fp32=f.bool("residual_in_fp32", True),
    )
    if layer == "Mamba1":
        kw["arch"] = "mamba1"
        kw["dt_rank"] = math.ceil(d_model / 16) if s["dt_rank"] in (None, "auto") else sf.int("dt_rank")
    else:
        kw["arch"] = "mamba2"
        kw["head_dim"] = sf.int("headdim")
        kw["n_groups"] = sf.int("ngroups")
        kw["chunk_size"] = sf.int("chunk_size")
        kw["time_step_limit"] = read_limit(s["dt_limit"], "ssm_cfg.dt_limit")
        if s["d_ssm"] is not None and sf.int("d_ssm") != kw["expand"] * d_model:
            raise DiffMambaError("mamba-ssm checkpoints with an MLP branch in the mixer (d_ssm < d_inner) are not supported")
    return MambaConfig(**kw)
