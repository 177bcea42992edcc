"""Recurrent state of a model: per scan unit (a Mamba-1/2 mixer, or a Diff-S6 core) the last K − 1
conv inputs and the SSM state, so a sequence can be run in pieces, decoded token by token and
patched in the middle.

`ModelState` maps scan-unit module paths (`"blocks.3.mixer"`, `"blocks.0.mixer_1"`,
`"blocks.2.mixer.ssm_1"`) to `MixerState(conv, ssm)`:
- conv [batch, C, K − 1]: the last K − 1 inputs of the causal conv, oldest first (C = E for
  Mamba-1, E + 2GN for Mamba-2); the two cores of a Diff-S6 mixer of the Mamba-1 form share one conv
  (the same tensor), the two branches of the Mamba-2 form convolve their own xBC and have their own;
- ssm [batch, E, N] (Mamba-1) or [batch, H, P, N] (Mamba-2): h after the last position.
`seen` counts the tokens the state has consumed. States are produced by
`model(ids, return_state=True)` or `model.init_state(batch)` and consumed by `model(ids, state=...)`;
a forward never modifies the state it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from .errors import DiffMambaError

Tensor = torch.Tensor


@dataclass
class MixerState:
    """The state of one scan unit: conv [batch, C, K − 1] and ssm [batch, E, N] or [batch, H, P, N]."""

    conv: Tensor
    ssm: Tensor

    def clone(self) -> "MixerState":
        return MixerState(self.conv.clone(), self.ssm.clone())

    def to(self, *args, **kwargs) -> "MixerState":
        return MixerState(self.conv.to(*args, **kwargs), self.ssm.to(*args, **kwargs))


@dataclass
class ModelState(Mapping[str, MixerState]):
    """Per scan-unit `MixerState`s of a model, keyed by module path, and the number of tokens `seen`."""

    entries: dict[str, MixerState] = field(default_factory=dict)
    seen: int = 0

    def __getitem__(self, key: str) -> MixerState:
        if key not in self.entries:
            raise DiffMambaError(f"no state for {key!r}; the state has {', '.join(self.entries) or 'no entries'}")
        return self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def batch(self) -> int:
        return next(iter(self.entries.values())).ssm.shape[0]

    def clone(self) -> "ModelState":
        conv = {}  # keep shared convs shared
        out = {}
        for k, v in self.entries.items():
            conv.setdefault(id(v.conv), v.conv.clone())
            out[k] = MixerState(conv[id(v.conv)], v.ssm.clone())
        return ModelState(out, self.seen)

    def to(self, *args, **kwargs) -> "ModelState":
        """Move / cast every tensor (as `Tensor.to`)."""
        conv = {}
        out = {}
        for k, v in self.entries.items():
            conv.setdefault(id(v.conv), v.conv.to(*args, **kwargs))
            out[k] = MixerState(conv[id(v.conv)], v.ssm.to(*args, **kwargs))
        return ModelState(out, self.seen)

    def select(self, rows) -> "ModelState":
        """The state of some batch rows (an index, a list or a slice)."""
        conv = {}
        out = {}
        for k, v in self.entries.items():
            conv.setdefault(id(v.conv), v.conv[rows])
            out[k] = MixerState(conv[id(v.conv)], v.ssm[rows])
        return ModelState(out, self.seen)


class Recurrence:
    """What one forward reads (`state_in`, or zeros) and writes (`state_out`, when `collect`); with
    `in_place`, a one-token step may overwrite state_in's SSM tensors (`HookedMamba.forward`)."""

    def __init__(self, state_in: ModelState | None, collect: bool, in_place: bool = False):
        self.state_in = state_in
        self.collect = collect
        self.in_place = in_place
        self.out: dict[str, MixerState] = {}

    def conv_in(self, key: str) -> Tensor | None:
        return None if self.state_in is None else self.state_in[key].conv

    def ssm_in(self, key: str) -> Tensor | None:
        return None if self.state_in is None else self.state_in[key].ssm

    def put(self, key: str, conv: Tensor, ssm: Tensor) -> None:
        if self.collect:
            self.out[key] = MixerState(conv, ssm)

    def result(self, seen: int) -> ModelState:
        return ModelState(dict(self.out), seen)
