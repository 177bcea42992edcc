"""The architecture registry: one `ArchSpec` per architecture, and `create_block`, which builds layer i
of a model from its spec (as mamba-ssm's `create_block` picks a mixer from `ssm_layer_map`).

Adding an architecture = one mixer file in `mixers/` (implementing the `Mixer` protocol) + one
entry in `ARCHS`; nothing in the analysis code names architectures.

| arch | mixer of a plain layer | differential layers | λ form | saved as |
|---|---|---|---|---|
| mamba1 | Mamba1Mixer | — | — | transformers-mamba |
| mamba2 | Mamba2Mixer | — | — | transformers-mamba2 |
| diffmamba1 | Mamba1Mixer | DiffBlock of two Mamba1Mixers, expand halved | qk | diffmamba-interp |
| diffmamba2 | Mamba2Mixer | DiffBlock of two Mamba2Mixers, expand 1, head_dim / 2 | q1 | diffmamba2 |
| diffs6 | Mamba1Mixer | Block with a DiffS6Mixer (upstream's Mamba-1 form) | none | diffmamba-interp |
| diffs6mamba2 | Mamba2Mixer | Block with a DiffS6Mamba2Mixer (upstream's Mamba-2 form) | q1, one scalar | diffmamba-interp |
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from torch import nn

from .blocks import Block, DiffBlock
from .errors import DiffMambaError
from .mixers import DiffS6Mamba2Mixer, DiffS6Mixer, Mamba1Mixer, Mamba2Mixer, MixerDims

if TYPE_CHECKING:
    from .config import MambaConfig


def _same(dims: MixerDims) -> MixerDims:
    return dims


def _halve_expand(dims: MixerDims) -> MixerDims:
    """Diff-Mamba-1 branches: expand halved (1 when the base is 2), d_state as the base."""
    expand = dims.d_inner // dims.d_model
    return dataclasses.replace(dims, d_inner=max(1, expand // 2) * dims.d_model)


def _expand1_half_heads(dims: MixerDims) -> MixerDims:
    """Diff-Mamba-2 branches: expand 1 and head_dim / 2, so the same H, N and G as the base."""
    return dataclasses.replace(dims, d_inner=dims.d_model, head_dim=dims.head_dim // 2)


@dataclass(frozen=True)
class ArchSpec:
    """What defines an architecture.

    mixer: the mixer class of a plain layer (built from `MixerDims`).
    family: "mamba1" (S6 scans) or "mamba2" (SSD scans): a description for configs and formats.
    diff: how its differential layers are built: None (no differential layers), "block" (a
        `DiffBlock` of two `mixer`s sized by `branch_dims`) or "mixer" (a `Block` whose mixer is
        `diff_mixer`).
    branch_dims: the sizes of each branch's mixer, from the base mixer's sizes.
    lambda_form: "q1" or "qk" (differential.LAMBDA_FORMS); lambda_size: its vectors' size from the config
        (a `DiffBlock`'s; a differential mixer, diff "mixer", defines its own λ).
    save_format: the checkpoint format `save_pretrained` writes (a key of loading.FORMATS).
    diff_variant: the differential architecture `convert.mamba_to_diffmamba` turns this one into.
    """

    name: str
    mixer: type
    family: str
    save_format: str
    diff: Optional[str] = None
    branch_dims: Callable[[MixerDims], MixerDims] = _same
    diff_mixer: Optional[type] = None
    lambda_form: Optional[str] = None
    lambda_size: Callable[["MambaConfig"], int] = lambda cfg: cfg.d_state
    diff_variant: Optional[str] = None

    def mixer_dims(self, cfg: "MambaConfig", differential: bool = False) -> MixerDims:
        """The sizes of a plain layer's mixer, or (differential=True) of one branch of a differential layer."""
        dims = MixerDims(
            d_model=cfg.d_model, d_inner=cfg.expand * cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv,
            dt_rank=cfg.dt_rank if cfg.dt_rank is not None else math.ceil(cfg.d_model / 16), head_dim=cfg.head_dim,
            n_groups=cfg.n_groups, conv_bias=cfg.conv_bias, bias=cfg.bias, norm_eps=cfg.norm_eps,
            chunk_size=cfg.chunk_size, time_step_limit=cfg.time_step_limit,
        )
        return self.branch_dims(dims) if differential and self.diff == "block" else dims

    def check(self, cfg: "MambaConfig") -> None:
        """Raise DiffMambaError when the config's sizes cannot build this architecture's mixers."""
        check = getattr(self.mixer, "check_dims", None)
        if check is None:
            return
        for differential in (False, True) if self.diff == "block" else (False,):
            problem = check(self.mixer_dims(cfg, differential))
            if problem:
                raise DiffMambaError(problem + (" (differential mixers use expand 1 and head_dim / 2)" if differential else ""))


ARCHS: dict[str, ArchSpec] = {
    "mamba1": ArchSpec("mamba1", Mamba1Mixer, "mamba1", "transformers-mamba", diff_variant="diffmamba1"),
    "mamba2": ArchSpec("mamba2", Mamba2Mixer, "mamba2", "transformers-mamba2", diff_variant="diffmamba2"),
    "diffmamba1": ArchSpec("diffmamba1", Mamba1Mixer, "mamba1", "diffmamba-interp", diff="block",
                           branch_dims=_halve_expand, lambda_form="qk"),
    "diffmamba2": ArchSpec("diffmamba2", Mamba2Mixer, "mamba2", "diffmamba2", diff="block",
                           branch_dims=_expand1_half_heads, lambda_form="q1", lambda_size=lambda cfg: cfg.d_model),
    "diffs6": ArchSpec("diffs6", Mamba1Mixer, "mamba1", "diffmamba-interp", diff="mixer", diff_mixer=DiffS6Mixer),
    "diffs6mamba2": ArchSpec("diffs6mamba2", Mamba2Mixer, "mamba2", "diffmamba-interp", diff="mixer",
                             diff_mixer=DiffS6Mamba2Mixer),
}


def arch_spec(name: str) -> ArchSpec:
    """The registry entry of an architecture, or a one-line DiffMambaError naming the known ones."""
    if name not in ARCHS:
        raise DiffMambaError(f"unknown arch {name!r}; expected one of {', '.join(ARCHS)}")
    return ARCHS[name]


def create_block(cfg: "MambaConfig", i: int) -> nn.Module:
    """Layer i of a model with config `cfg`: a plain `Block` or a differential one, per its ArchSpec."""
    spec = arch_spec(cfg.arch)
    common = dict(norm_eps=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32)
    if spec.diff is None or i not in cfg.diff_layer_indices:
        return Block(cfg.d_model, spec.mixer(spec.mixer_dims(cfg)), i, **common)
    if spec.diff == "mixer":
        return Block(cfg.d_model, spec.diff_mixer(spec.mixer_dims(cfg), i), i, **common)
    dims = spec.mixer_dims(cfg, differential=True)
    return DiffBlock(cfg.d_model, spec.mixer(dims), spec.mixer(dims), i, lambda_form=spec.lambda_form,
                     lambda_size=spec.lambda_size(cfg), **common)
