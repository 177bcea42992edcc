"""The transformers config.json layouts: Mamba (`model_type: "mamba"`), Mamba-2 (`"mamba2"`) and the
paper's Diff-Mamba-2 (`"mamba2"` with `"diffmamba": true`), read into a `MambaConfig` and written
back from one. transformers writes infinity as `{"__float__": "Infinity"}`; both that and a bare
`Infinity` are read.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import MambaConfig
from ..errors import DiffMambaError
from .fields import Fields, decode_float, read_limit, show  # noqa: F401 (decode_float, read_limit: re-exported)

# the keys this module reads; anything else is kept in MambaConfig.extra and written back
KNOWN = {
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand",
    "conv_kernel", "use_bias", "use_conv_bias", "tie_word_embeddings", "residual_in_fp32",
    "time_step_rank", "intermediate_size", "head_dim", "n_groups", "chunk_size", "time_step_limit",
    "num_heads", "diffmamba", "diffmamba_settings", "model_type", "architectures",
}


def encode_float(x: float) -> Any:
    """Infinity / NaN the way transformers writes them ({"__float__": "Infinity"}), valid strict JSON."""
    return x if math.isfinite(x) else {"__float__": str(x).replace("inf", "Infinity").replace("nan", "NaN")}


def read_hf_config(d: dict[str, Any]) -> MambaConfig:
    """Read a transformers Mamba / Mamba-2 / Diff-Mamba-2 config.json; every field of the wrong type
    or value is a one-line DiffMambaError naming it (fields.py)."""
    model_type = d.get("model_type")
    if model_type not in ("mamba", "mamba2"):
        raise DiffMambaError(f"unknown model_type {model_type!r} (expected 'mamba' or 'mamba2')")
    f = Fields(d)
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise DiffMambaError(f"field 'hidden_act' must be \"silu\" (the only activation of these mixers), got {show(act)}")
    hidden = f.int("hidden_size")
    kw: dict[str, Any] = dict(
        d_model=hidden,
        n_layers=f.int("num_hidden_layers"),
        vocab_size=f.int("vocab_size"),
        d_state=f.int("state_size", 16 if model_type == "mamba" else 128),
        d_conv=f.int("conv_kernel", 4),
        expand=f.int("expand", 2),
        conv_bias=f.bool("use_conv_bias", True),
        bias=f.bool("use_bias", False),
        norm_eps=f.float("layer_norm_epsilon", 1e-5, positive=True),
        tie_embeddings=f.bool("tie_word_embeddings", True),
        residual_in_fp32=f.bool("residual_in_fp32", True),
    )
    rank = d.get("time_step_rank", "auto")
    dt_rank = math.ceil(hidden / 16) if rank in (None, "auto") else f.int("time_step_rank")
    if model_type == "mamba":
        kw["dt_rank"] = dt_rank
        kw["arch"] = "mamba1"
        if "intermediate_size" in d and f.int("intermediate_size") != kw["expand"] * hidden:
            raise DiffMambaError(f"intermediate_size {d['intermediate_size']} != expand * hidden_size")
    else:
        kw["head_dim"] = f.int("head_dim", 64)
        kw["n_groups"] = f.int("n_groups", 1)
        kw["chunk_size"] = f.int("chunk_size", 256)
        kw["time_step_limit"] = read_limit(d.get("time_step_limit"))
        if "num_heads" in d and f.int("num_heads") * kw["head_dim"] != kw["expand"] * hidden:
            raise DiffMambaError(
                f"num_heads {d['num_heads']} * head_dim {kw['head_dim']} != expand * hidden_size {kw['expand'] * hidden}"
            )
        if f.bool("diffmamba", False):
            kw["arch"] = "diffmamba2"
            kw["diff_layers"] = read_diff_layers(d.get("diffmamba_settings", "alternate"), "diffmamba_settings")
        else:
            kw["arch"] = "mamba2"
    kw["extra"] = {k: v for k, v in d.items() if k not in KNOWN}
    return MambaConfig(**kw)


def read_diff_layers(value: Any, name: str = "diff_layers"):
    """"alternate" / "all" / "quarter", or a list of block indices (whole numbers)."""
    from ..config import DIFF_SETTINGS

    if isinstance(value, str) and value in DIFF_SETTINGS:
        return value
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return value
    raise DiffMambaError(
        f"field '{name}' must be one of {', '.join(map(repr, DIFF_SETTINGS))} or a list of block indices, got {show(value)}"
    )


def write_hf_config(cfg: MambaConfig) -> dict[str, Any]:
    """The config.json of the transformers / upstream Diff-Mamba layout for mamba1, mamba2, diffmamba2."""
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "state_size": cfg.d_state,
        "num_hidden_layers": cfg.n_layers,
        "layer_norm_epsilon": cfg.norm_eps,
        "expand": cfg.expand,
        "conv_kernel": cfg.d_conv,
        "use_bias": cfg.bias,
        "use_conv_bias": cfg.conv_bias,
        "hidden_act": "silu",
        "residual_in_fp32": cfg.residual_in_fp32,
        "tie_word_embeddings": cfg.tie_embeddings,
        "time_step_rank": cfg.mixer_dims().dt_rank,
    }
    if cfg.family == "mamba1":
        out = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "intermediate_size": cfg.d_inner, **common}
    else:
        lim = cfg.time_step_limit
        out = {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            **common,
            "num_heads": cfg.n_heads,
            "head_dim": cfg.head_dim,
            "n_groups": cfg.n_groups,
            "chunk_size": cfg.chunk_size,
            "rms_norm": True,
            "norm_before_gate": False,
            "time_step_limit": [lim[0], encode_float(lim[1])],
        }
        if cfg.is_diff:
            out["architectures"] = ["DiffMamba2ForCausalLM"]
            out["diffmamba"] = True
            out["diffmamba_settings"] = cfg.diff_layers
    return {**cfg.extra, **out}
