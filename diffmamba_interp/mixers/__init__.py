"""Mixers: one file per kind, each implementing the `Mixer` protocol of base.py.

| file | class | what |
|---|---|---|
| base.py | `MixerDims`, `ScanUnit`, `Mixer` | sizes, the scan protocol, the mixer protocol |
| mamba1.py | `Mamba1Mixer`, `S6Core`, `S6`, `ConvFront` | Mamba-1 (S6) |
| mamba2.py | `Mamba2Mixer` | Mamba-2 (SSD) |
| diffs6.py | `DiffS6Mixer` | Diff-S6: the difference inside one Mamba-1 mixer |
"""

from .base import Mixer, MixerDims, ScanUnit, is_hooked
from .diffs6 import DiffS6Mixer
from .mamba1 import S6, ConvFront, Mamba1Mixer, S6Core
from .mamba2 import Mamba2Mixer

__all__ = ["Mixer", "MixerDims", "ScanUnit", "is_hooked", "Mamba1Mixer", "Mamba2Mixer", "DiffS6Mixer", "S6Core", "S6",
           "ConvFront"]
