import pytest
import torch

# `make test` runs two pytest workers on two cores: one torch thread each (tiny ops are far slower
# with two threads competing for a busy core)
torch.set_num_threads(1)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init (A, D, dt bias, norms, λ...) so tests see real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return model


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
