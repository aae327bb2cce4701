"""`advcl pseudo-labels` (not built yet)."""

from __future__ import annotations

import typer

from ..errors import NotImplementedYet

app = typer.Typer(help="ClusterFit pseudo labels for AdvCL (not implemented yet).", add_completion=False)


@app.callback(invoke_without_command=True)
def pseudo_labels() -> None:
    raise NotImplementedYet("pseudo-labels")
