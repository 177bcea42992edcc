"""`MambaConfig`: a plain description of a (Diff-)Mamba language model (sizes, architecture, which
layers are differential). Reading and writing checkpoint configs lives in `loading/`; what each
architecture builds lives in `archs.py`.

Dimension names used throughout the package (docs/conventions.md):
    d = d_model     E = d_inner = expand * d     N = d_state     K = d_conv (conv kernel width)
    H = n_heads     P = head_dim (E = H * P)     G = n_groups    R = dt_rank
    L = pos = sequence length                    V = vocab_size
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

from .archs import ARCHS as _REGISTRY
from .archs import ArchSpec, arch_spec
from .errors import DiffMambaError
from .mixers import MixerDims

ARCHS = tuple(_REGISTRY)  # architecture names, in registry order
DIFF_SETTINGS = ("alternate", "all", "quarter")
DiffLayers = Union[str, Sequence[int]]
_INT_FIELDS = ("d_model", "n_layers", "vocab_size", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size",
               "pad_vocab_size_multiple")
_BOOL_FIELDS = ("conv_bias", "bias", "tie_embeddings", "residual_in_fp32")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise DiffMambaError(f"config field {name} must be a positive integer, got {value!r}")
    return int(value)


def _check_limit(value: Any) -> tuple[float, float]:
    """time_step_limit: two numbers (low, high), neither NaN, 0 <= low <= high (high may be inf)."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise DiffMambaError(f"config field time_step_limit must be a pair (low, high), got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in (lo, hi)) or not 0 <= lo <= hi:
        raise DiffMambaError(f"config field time_step_limit must be two numbers with 0 <= low <= high, got {value!r}")
    return (float(lo), float(hi))


@dataclass
class MambaConfig:
    """Sizes and architecture of a (Diff-)Mamba language model.

    arch: a key of the registry `archs.ARCHS`: "mamba1" (S6), "mamba2" (SSD), "diffmamba1",
    "diffmamba2" (two mixers per differential layer), "diffs6" or "diffs6mamba2" (the paper's
    ablation, the difference inside one mixer, in upstream's Mamba-1 form, `diffs6block.py`, and
    Mamba-2 form, `diffs6mamba2block.py`; mixers/diffs6.py).
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

    # -- the fields TransformerLens's analysis and patching helpers read (not saved; see tl_fields) --
    # class attributes, not dataclass fields: never written to config.json. `device` and `dtype` follow
    # the model (HookedMamba sets them on construction and on .to()).
    attn_only = False  # there is no MLP: a block is the mixer
    d_mlp = None
    n_key_value_heads = None
    normalization_type = "RMS"  # pre-norm RMSNorm; norm_f is RMS as well
    final_rms = True
    positional_embedding_type = "none"
    act_fn = "silu"
    default_prepend_bos = False
    tokenizer_prepends_bos = False
    n_devices = 1
    use_split_qkv_input = False
    use_attn_result = False
    device = "cpu"
    dtype = None
    N_CTX = 131_072  # no positional limit; the longest context the toolkit is tested at (chunked prefill)

    def __post_init__(self) -> None:
        """Validate every field: a one-line DiffMambaError naming the first field of the wrong type or value."""
        if not isinstance(self.arch, str):
            raise DiffMambaError(f"config field arch must be an architecture name, got {self.arch!r}")
        spec = arch_spec(self.arch)
        for name in _INT_FIELDS:
            setattr(self, name, _check_int(name, getattr(self, name)))
        if self.dt_rank is not None:
            self.dt_rank = _check_int("dt_rank", self.dt_rank)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise DiffMambaError(f"config field {name} must be True or False, got {value!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise DiffMambaError(f"config field norm_eps must be a positive finite number, got {eps!r}")
        self.norm_eps = float(eps)
        self.time_step_limit = _check_limit(self.time_step_limit)
        if not isinstance(self.extra, dict):
            raise DiffMambaError(f"config field extra must be a dict, got {type(self.extra).__name__}")
        spec.check(self)
        layers = self.diff_layers
        if isinstance(layers, str):
            if layers not in DIFF_SETTINGS:
                raise DiffMambaError(f"unknown diff_layers setting {layers!r}; expected one of {DIFF_SETTINGS} or a list")
            return
        if not isinstance(layers, (list, tuple)) or not all(map(_is_int, layers)):
            raise DiffMambaError(
                f"config field diff_layers must be one of {', '.join(map(repr, DIFF_SETTINGS))} or a list of block "
                f"indices, got {layers!r}"[:300]
            )
        bad = [i for i in layers if not 0 <= i < self.n_layers]
        if bad:
            raise DiffMambaError(f"diff_layers {bad} out of range for n_layers {self.n_layers}")
        if len(set(layers)) != len(layers):
            raise DiffMambaError(f"diff_layers {list(layers)} names a block twice")
        self.diff_layers = sorted(int(i) for i in layers)

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def spec(self) -> ArchSpec:
        """This architecture's registry entry (`archs.ARCHS[arch]`)."""
        return arch_spec(self.arch)

    @property
    def family(self) -> str:
        """"mamba1" for S6-based archs, "mamba2" for SSD-based ones (from the registry)."""
        return self.spec.family

    @property
    def is_diff(self) -> bool:
        """Whether the architecture has differential layers at all."""
        return self.spec.diff is not None

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

    @property
    def d_vocab(self) -> int:
        """TransformerLens's name for vocab_size."""
        return self.vocab_size

    @property
    def d_vocab_out(self) -> int:
        return self.vocab_size

    @property
    def n_ctx(self) -> int:
        """TransformerLens's context length: a Mamba model has none; the tested limit (N_CTX)."""
        return self.N_CTX

    @property
    def d_head(self) -> int:
        """TransformerLens's per-head size: the SSD head dim P (Mamba-2 families)."""
        return self.head_dim

    @property
    def original_architecture(self) -> str:
        return self.arch

    def is_diff_layer(self, i: int) -> bool:
        return i in self.diff_layer_indices

    def mixer_dims(self, differential: bool = False) -> MixerDims:
        """Sizes of one mixer; for a differential block, of each of its two mixers (see archs.py)."""
        return self.spec.mixer_dims(self, differential)

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
