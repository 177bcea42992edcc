"""`python -m diffmamba_interp ...` (and `torchrun ... -m diffmamba_interp ...`): the CLI."""

from .cli import app

app()
