"""Plain helper functions for tests (fixtures live in conftest.py)."""

import pytest
import torch


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init (A, D, dt bias, norms, λ...) so tests see real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return model


def one_line_error(fn, *args, **kwargs) -> str:
    """Call fn expecting a DiffMambaError whose message is one non-empty line; return the message."""
    from diffmamba_interp.errors import DiffMambaError

    with pytest.raises(DiffMambaError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def assert_identity(got, want, rel=1e-12):
    """max |got − want| ≤ rel · max |want|, on a non-degenerate `want` (an exact identity to rounding)."""
    scale = want.abs().max().item()
    err = (got.detach() - want.detach()).abs().max().item()
    assert scale > 1e-5, f"degenerate identity: scale {scale:.3g}"
    assert err <= rel * scale, f"max abs err {err:.3g} (scale {scale:.3g})"


def hand_patch_loop(model, clean, corrupt, name, metric):
    """Activation patching the TransformerLens way: one full corrupted forward per position with hook
    `name`'s value there replaced by the clean run's -> metric(last position's logits [1, V]) per
    position, as a numpy array."""
    import numpy as np

    _, cache = model.run_with_cache(clean, names_filter=[name])
    out = []
    for p in range(corrupt.shape[1]):
        def put(t, hook, p=p):
            t = t.clone()
            t[:, p] = cache[name][:, p]
            return t
        with torch.no_grad():
            out.append(float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, put)])[:, -1])[0]))
    return np.array(out)
