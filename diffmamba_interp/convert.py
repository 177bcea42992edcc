"""`mamba_to_diffmamba`: a pretrained Mamba-1/2 model -> Diff-Mamba-1/2 with the upstream fine-tuning
initialisation (docs/conventions.md, "Mamba → Diff-Mamba initialisation"; upstream
github.com/NadavSc/Diff-Mamba).

In each differential layer, every parameter of the two halved mixers is taken from the pretrained
mixer's parameter of the same name:
- equal shape -> copied to both mixers (Mamba-2 with expand 2: dt_bias, A_log, D [H]; any bias of
  size d such as out_proj.bias);
- otherwise exactly one dimension is smaller, and mixer_1 takes the first, mixer_2 the last slice
  along it: rows of in_proj and conv1d, columns of out_proj, entries of norm.weight. This is literal,
  as upstream does: the Mamba-2 in_proj rows are [z (E), xBC (E+2GN), dt (H)] and the halved
  mixer's are [z (E/2), xBC (E/2+2GN), dt (H)], so mixer_1's in_proj is the pretrained matrix's
  first 2E'+2GN+H rows whatever part each row came from (and mixer_2's the last ones); likewise for
  Mamba-1, in_proj [x (E), z (E)] -> first / last E rows.
- Mamba-1 (to diffmamba1, expand halved): A_log [E, N], D [E], dt_proj.weight [E, R] and
  dt_proj.bias [E] are per channel and E is halved, so none has equal shape: they are sliced like
  the rest (first / last rows or entries), and x_proj [R+2N, E] by columns.
λ parameters keep their module init (Diff-Mamba-2: lambda_q1 = randn(d), std 1, as upstream); subln.weight is ones. Embedding, block norms,
norm_f, lm_head and the non-differential layers are copied unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch

from .config import DIFF_SETTINGS, MambaConfig
from .errors import DiffMambaError
from .archs import ARCHS
from .model import HookedMamba

log = logging.getLogger(__name__)

_MIXER_PARAM = re.compile(r"^blocks\.(\d+)\.mixer_([12])\.(.+)$")


def split_for_mixer(src: torch.Tensor, shape: torch.Size, which: int) -> tuple[torch.Tensor, str]:
    """The part of a pretrained mixer tensor that mixer `which` (1 or 2) starts from, and a note.

    Equal shape: the whole tensor. Else the one dimension that differs is sliced: first (mixer 1)
    or last (mixer 2) `shape[dim]` entries along it.
    """
    if src.shape == shape:
        return src, "copied"
    dims = [i for i, (a, b) in enumerate(zip(src.shape, shape)) if a != b] if src.ndim == len(shape) else None
    if not dims or len(dims) != 1 or shape[dims[0]] > src.shape[dims[0]]:
        raise DiffMambaError(f"cannot split a pretrained tensor of shape {list(src.shape)} into a mixer tensor of shape {list(shape)}")
    dim, n = dims[0], shape[dims[0]]
    start = 0 if which == 1 else src.shape[dim] - n
    return src.narrow(dim, start, n), f"dim {dim} [{start}:{start + n}]"


def mamba_to_diffmamba(model, settings="alternate"):
    """A new Diff-Mamba model (diffmamba2 from mamba2, diffmamba1 from mamba1), in eval mode, on
    the source's device and dtype, initialised from `model` as upstream does for fine-tuning (see
    the module docstring for which slice goes where). `settings`: "alternate", "all", "quarter" or
    a list of block indices."""
    cfg: MambaConfig = model.cfg
    target = cfg.spec.diff_variant
    if target is None:
        convertible = [name for name, spec in ARCHS.items() if spec.diff_variant]
        raise DiffMambaError(f"mamba_to_diffmamba converts {' or '.join(convertible)} models, not {cfg.arch}")
    if isinstance(settings, str) and settings not in DIFF_SETTINGS:
        raise DiffMambaError(f"unknown diff setting {settings!r}; expected one of {', '.join(DIFF_SETTINGS)} or a list of layers")
    try:
        new_cfg = dataclasses.replace(cfg, arch=target, diff_layers=settings, extra=dict(cfg.extra))
    except DiffMambaError as e:
        raise DiffMambaError(f"cannot convert {cfg.arch} to {target}: {e}") from None
    new = HookedMamba(new_cfg).to(device=model.device, dtype=model.dtype)
    src = model.state_dict()
    moved = []
    with torch.no_grad():
        for name, p in new.named_parameters():  # a tied lm_head is listed once, as embed.weight
            m = _MIXER_PARAM.match(name)
            if m:
                i, which, rest = m.groups()
                key = f"blocks.{i}.mixer.{rest}"
                part, how = split_for_mixer(src[key], p.shape, int(which))
                p.copy_(part)
                moved.append(f"{name} <- {key} {how}")
            elif name in src and src[name].shape == p.shape:
                p.copy_(src[name])
            elif re.search(r"\.(lambda_[qk][12]|subln\.weight)$", name):
                pass  # λ vectors keep their module init; subln weight starts at ones
            else:
                raise DiffMambaError(f"mamba_to_diffmamba: no pretrained tensor for {name}")
    log.debug("mamba_to_diffmamba: %s", "; ".join(moved))
    new.tokenizer = getattr(model, "tokenizer", None)
    return new.eval()
