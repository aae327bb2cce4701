"""`advcl import`: an original research checkpoint -> an advcl encoder.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import JsonOpt, check_output
from .output import Output


def import_checkpoint(
    file: Annotated[Path, typer.Argument(help="The original AdvCL checkpoint (epoch_N.ckpt).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the encoder (default FILE's name with .safetensors).", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset it was pretrained on, for the metadata (default cifar10).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Convert an original AdvCL pretraining checkpoint into an advcl encoder; print its path.

    The file is read with torch.load(weights_only=True): no code in it runs. Every tensor must
    map onto the advcl model (the unused head_pred and head_ce heads are dropped), otherwise
    the import fails and lists what did not match. BN sets 0/1/2 become normal/pgd/pgd_ce.

    Example:

    \b
      advcl import checkpoint/AdvCL_Cifar10/epoch_1000.ckpt --out advcl-cifar10.safetensors
      advcl finetune advcl-cifar10.safetensors --scheme slf
    """
    from ..data.registry import num_classes_of
    from ..importer import import_original

    num_classes_of(dataset or "cifar10")  # an unknown dataset is refused before anything is read
    target = out or Path(file.name).with_suffix(".safetensors")
    check_output(target, force, "--out", {"the checkpoint being imported": file})
    path = import_original(file, target, dataset=dataset or "cifar10")
    output = Output(json_output)
    if json_output:
        from ..checkpoint import read_metadata

        output.document({"path": str(path), **read_metadata(path).model_dump(mode="json")})
    else:
        output.result(path)
