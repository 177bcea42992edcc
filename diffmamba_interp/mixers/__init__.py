"""Mixers: one file per kind, each implementing the `Mixer` protocol of base.py.

| file | class | what |
|---|---|---|
| base.py | `MixerDims`, `ScanUnit`, `Mixer` | sizes, the scan protocol, the mixer protocol |
| mamba1.py | `Mamba1Mixer`, `S6Core`, `ConvFront` | Mamba-1 (S6) |
| mamba2.py | `Mamba2Mixer` | Mamba-2 (SSD) |
| diffs6.py | `DiffS6Mixer`, `DiffS6Mamba2Mixer` | Diff-S6 in upstream's two forms (inside a Mamba-1 / Mamba-2 mixer) |
"""

from .base import Mixer, MixerDims, ScanUnit, is_hooked
from .diffs6 import DiffS6Mamba2Mixer, DiffS6Mixer
from .mamba1 import ConvFront, Mamba1Mixer, S6Core
from .mamba2 import Mamba2Mixer

__all__ = ["Mixer", "MixerDims", "ScanUnit", "is_hooked", "Mamba1Mixer", "Mamba2Mixer", "DiffS6Mixer",
           "DiffS6Mamba2Mixer", "S6Core", "ConvFront"]
