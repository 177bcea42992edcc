"""`MambaConfig`: one config for the five architectures of SPEC §1, and the transformers config.json
formats (Mamba, Mamba-2, Diff-Mamba-2) read into it and written back from it.

Dimension names used throughout the package:
    d = d_model     E = d_inner = expand * d     N = d_state     K = d_conv (conv kernel width)
    H = n_heads     P = head_dim (E = H * P)     G = n_groups    R = dt_rank
    L = pos = sequence length                    V = vocab_size
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from .errors import DiffMambaError

ARCHS = ("mamba1", "mamba2", "diffmamba1", "diffmamba2", "diffs6")
DIFF_SETTINGS = ("alternate", "all", "quarter")
DiffLayers = Union[str, Sequence[int]]


@dataclass
class MixerDims:
    """The sizes one mixer is built with (a differential block's mixers get halved sizes)."""

    d_model: int
    d_inner: int  # E
    d_state: int  # N
    d_conv: int  # K
    dt_rank: int  # R (Mamba-1)
    head_dim: int  # P (Mamba-2)
    n_groups: int  # G (Mamba-2)
    conv_bias: bool
    bias: bool
    norm_eps: float
    chunk_size: int
    time_step_limit: tuple[float, float]

    @property
    def n_heads(self) -> int:  # H
        return self.d_inner // self.head_dim


@dataclass
class MambaConfig:
    """Sizes and architecture of a (Diff-)Mamba language model.

    arch: "mamba1" (S6), "mamba2" (SSD), "diffmamba1", "diffmamba2" (two mixers, SPEC §1) or
    "diffs6" (the paper's ablation: the difference inside one S6 block).
    diff_layers: which blocks are differential in a diff arch: "alternate" (even indices), "all",
    "quarter" (the last n_layers // 4) or an explicit list of block indices.
    """

    arch: str = "mamba2"
    d_model: int = 64
    n_layers: int = 2
    vocab_size: int = 256
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None -> ceil(d_model / 16)
    head_dim: int = 16
    n_groups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    diff_layers: DiffLayers = "alternate"
    pad_vocab_size_multiple: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept for saving

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise DiffMambaError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        for name in ("d_model", "n_layers", "vocab_size", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DiffMambaError(f"config field {name} must be a positive integer, got {value!r}")
        self.time_step_limit = (float(self.time_step_limit[0]), float(self.time_step_limit[1]))
        if self.family == "mamba2":
            for diff in (False, True) if self.is_diff else (False,):
                dims = self.mixer_dims(diff)
                if dims.head_dim <= 0 or dims.d_inner % dims.head_dim:
                    raise DiffMambaError(
                        f"d_inner {dims.d_inner} is not a multiple of head_dim {dims.head_dim}"
                        + (" (differential mixers use expand 1 and head_dim / 2)" if diff else "")
                    )
                if dims.n_heads % dims.n_groups:
                    raise DiffMambaError(f"n_heads {dims.n_heads} is not a multiple of n_groups {dims.n_groups}")
        if not isinstance(self.diff_layers, str):
            self.diff_layers = sorted(int(i) for i in self.diff_layers)
            bad = [i for i in self.diff_layers if not 0 <= i < self.n_layers]
            if bad:
                raise DiffMambaError(f"diff_layers {bad} out of range for n_layers {self.n_layers}")
        elif self.diff_layers not in DIFF_SETTINGS:
            raise DiffMambaError(f"unknown diff_layers setting {self.diff_layers!r}; expected one of {DIFF_SETTINGS} or a list")

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """"mamba1" for S6-based archs (mamba1, diffmamba1, diffs6), "mamba2" for SSD-based ones."""
        return "mamba2" if self.arch in ("mamba2", "diffmamba2") else "mamba1"

    @property
    def is_diff(self) -> bool:
        return self.arch.startswith("diff")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def diff_layer_indices(self) -> tuple[int, ...]:
        if not self.is_diff:
            return ()
        if not isinstance(self.diff_layers, str):
            return tuple(self.diff_layers)
        if self.diff_layers == "all":
            return tuple(range(self.n_layers))
        if self.diff_layers == "alternate":
            return tuple(range(0, self.n_layers, 2))
        return tuple(range(self.n_layers - self.n_layers // 4, self.n_layers))  # quarter

    def is_diff_layer(self, i: int) -> bool:
        return i in self.diff_layer_indices

    def mixer_dims(self, differential: bool = False) -> MixerDims:
        """Sizes of one mixer; for a differential block of diffmamba1/2, each of its two mixers.

        Diff-Mamba-2 mixers: expand 1 and head_dim / 2 (same H, N, G). Diff-Mamba-1 mixers: expand
        halved. Diff-S6 keeps the full mixer (its two S6 cores share in_proj/conv/out_proj).
        """
        expand, head_dim = self.expand, self.head_dim
        if differential and self.arch == "diffmamba2":
            expand, head_dim = 1, self.head_dim // 2
        elif differential and self.arch == "diffmamba1":
            expand = max(1, self.expand // 2)
        return MixerDims(
            d_model=self.d_model,
            d_inner=expand * self.d_model,
            d_state=self.d_state,
            d_conv=self.d_conv,
            dt_rank=self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16),
            head_dim=head_dim,
            n_groups=self.n_groups,
            conv_bias=self.conv_bias,
            bias=self.bias,
            norm_eps=self.norm_eps,
            chunk_size=self.chunk_size,
            time_step_limit=self.time_step_limit,
        )

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_step_limit"] = list(self.time_step_limit)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DiffMambaError(f"unknown MambaConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of the transformers / upstream Diff-Mamba layout (SPEC §2)."""
        if self.arch in ("diffmamba1", "diffs6"):
            raise DiffMambaError(f"arch {self.arch} has no transformers config layout; save_pretrained writes our own")
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "state_size": self.d_state,
            "num_hidden_layers": self.n_layers,
            "layer_norm_epsilon": self.norm_eps,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "hidden_act": "silu",
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "time_step_rank": self.mixer_dims().dt_rank,
        }
        if self.family == "mamba1":
            out = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "intermediate_size": self.d_inner, **common}
        else:
            lim = self.time_step_limit
            out = {
                "model_type": "mamba2",
                "architectures": ["Mamba2ForCausalLM"],
                **common,
                "num_heads": self.n_heads,
                "head_dim": self.head_dim,
                "n_groups": self.n_groups,
                "chunk_size": self.chunk_size,
                "rms_norm": True,
                "norm_before_gate": False,
                # transformers writes infinity as {"__float__": "Infinity"}; json.dump would write Infinity
                "time_step_limit": [lim[0], lim[1] if math.isfinite(lim[1]) else {"__float__": "Infinity"}],
            }
            if self.arch == "diffmamba2":
                out["architectures"] = ["DiffMamba2ForCausalLM"]
                out["diffmamba"] = True
                out["diffmamba_settings"] = self.diff_layers
        return {**self.extra, **out}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        """Read a transformers Mamba / Mamba-2 / Diff-Mamba-2 config.json (SPEC §2)."""
        model_type = d.get("model_type")
        if model_type not in ("mamba", "mamba2"):
            raise DiffMambaError(f"unknown model_type {model_type!r} (expected 'mamba' or 'mamba2')")
        try:
            hidden = int(d["hidden_size"])
            kw: dict[str, Any] = dict(
                d_model=hidden,
                n_layers=int(d["num_hidden_layers"]),
                vocab_size=int(d["vocab_size"]),
                d_state=int(d.get("state_size", 16 if model_type == "mamba" else 128)),
                d_conv=int(d.get("conv_kernel", 4)),
                expand=int(d.get("expand", 2)),
                conv_bias=bool(d.get("use_conv_bias", True)),
                bias=bool(d.get("use_bias", False)),
                norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(d.get("tie_word_embeddings", True)),
                residual_in_fp32=bool(d.get("residual_in_fp32", True)),
            )
            if model_type == "mamba":
                rank = d.get("time_step_rank", "auto")
                kw["dt_rank"] = math.ceil(hidden / 16) if rank in (None, "auto") else int(rank)
                kw["arch"] = "mamba1"
                if "intermediate_size" in d and int(d["intermediate_size"]) != kw["expand"] * hidden:
                    raise DiffMambaError(f"intermediate_size {d['intermediate_size']} != expand * hidden_size")
            else:
                kw["head_dim"] = int(d.get("head_dim", 64))
                kw["n_groups"] = int(d.get("n_groups", 1))
                kw["chunk_size"] = int(d.get("chunk_size", 256))
                kw["time_step_limit"] = _read_limit(d.get("time_step_limit"))
                if "num_heads" in d and int(d["num_heads"]) * kw["head_dim"] != kw["expand"] * hidden:
                    raise DiffMambaError(
                        f"num_heads {d['num_heads']} * head_dim {kw['head_dim']} != expand * hidden_size {kw['expand'] * hidden}"
                    )
                if d.get("diffmamba"):
                    kw["arch"] = "diffmamba2"
                    kw["diff_layers"] = d.get("diffmamba_settings", "alternate")
                else:
                    kw["arch"] = "mamba2"
        except KeyError as e:
            raise DiffMambaError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise DiffMambaError(f"config.json has a field of the wrong type: {e}") from None
        known = {
            "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand",
            "conv_kernel", "use_bias", "use_conv_bias", "tie_word_embeddings", "residual_in_fp32",
            "time_step_rank", "intermediate_size", "head_dim", "n_groups", "chunk_size", "time_step_limit",
            "num_heads", "diffmamba", "diffmamba_settings", "model_type", "architectures",
        }
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kw)


def _read_limit(value: Any) -> tuple[float, float]:
    """time_step_limit as written by transformers: absent, [0.0, Infinity] or [0.0, {"__float__": "Infinity"}]."""
    if value is None:
        return (0.0, math.inf)

    def num(v: Any) -> float:
        if isinstance(v, dict) and "__float__" in v:
            return float(v["__float__"])
        return float(v)

    try:
        lo, hi = value
        return (num(lo), num(hi))
    except (TypeError, ValueError):
        raise DiffMambaError(f"time_step_limit {value!r} is not a pair of numbers") from None
