"""`advcl zoo` (not built yet)."""

from __future__ import annotations

import typer

from ..errors import NotImplementedYet

app = typer.Typer(help="The model zoo (not implemented yet).", add_completion=False, no_args_is_help=True)


@app.command("list")
def list_entries() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("zoo list")


@app.command("info")
def info() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("zoo info")
