"""The `diffmamba-interp` command line: thin commands over the Python API."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    help="Mechanistic interpretability for Mamba and Diff-Mamba models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffmamba-interp {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Mechanistic interpretability for Mamba and Diff-Mamba models."""
