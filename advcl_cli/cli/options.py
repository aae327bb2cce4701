"""Options shared by several verbs, as ``Annotated`` aliases in one place, and the MODEL argument."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML config file (default: $ADVCL_CONFIG or ./advcl.toml).", show_default=False),
]
DatasetOpt = Annotated[
    Optional[str],
    typer.Option("--dataset", "-d", help="cifar10, cifar100, stl10, digits (offline) or imagefolder:PATH.", show_default=False),
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Where datasets live (default: $ADVCL_DATA_DIR or ~/.cache/advcl/data).", show_default=False),
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default 0).", show_default=False)]
LimitOpt = Annotated[
    Optional[int], typer.Option("--limit", help="Use only the first N images (smoke runs).", show_default=False)
]
ImageSizeOpt = Annotated[
    Optional[int], typer.Option("--image-size", help="Resize images to this square size.", show_default=False)
]
EpsOpt = Annotated[
    Optional[str], typer.Option("--eps", help="L-inf budget, as 8/255 or 0.031 (default 8/255).", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ManifestOpt = Annotated[
    Optional[Path],
    typer.Option("--manifest", help="Zoo manifest file (default: $ADVCL_ZOO_MANIFEST or the one shipped with advcl).", show_default=False),
]
EndpointOpt = Annotated[
    Optional[str],
    typer.Option("--endpoint", help="Hub URL, e.g. a mirror (default: $ADVCL_HF_ENDPOINT, $HF_ENDPOINT or https://huggingface.co).", show_default=False),
]
ModelArg = Annotated[
    Optional[str],
    typer.Argument(
        help="Checkpoint path, zoo name, or '-' / omitted to read a path from stdin.", show_default=False
    ),
]


def model_path(value: str | None) -> Path:
    """Resolve a MODEL argument: a path, a zoo name (pulled), or a path on stdin."""
    if value in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no MODEL given", "pass a checkpoint path or zoo name, or pipe one: advcl pull NAME | advcl eval")
        try:
            text = sys.stdin.read()
        except OSError:
            text = ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UsageError("no MODEL given: stdin was empty", "did the command before the pipe fail?")
        value = lines[-1]
    from ..zoo import resolve
    from .output import Output

    return resolve(value, reporter=Output().reporter())


def refuse_overwrite(path: Path, force: bool, flag: str = "--out") -> None:
    """An output file that exists is replaced only with --force."""
    if path.exists() and not force:
        raise UsageError(f"{flag} {path} already exists", f"pass --force to overwrite it, or choose another {flag} path")
