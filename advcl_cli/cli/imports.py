"""`advcl import`: a published research checkpoint -> an advcl encoder.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..settings import ImportSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, check_output, settings_options, with_options
from .output import Output


def import_checkpoint(
    file: Annotated[Path, typer.Argument(help="The published checkpoint (AdvCL's epoch_N.ckpt, the RobustSSL benchmark's ACL_DS.pt, DynACL++.pt, ...).", show_default=False)],
    source: Annotated[Optional[str], typer.Option("--from", help="The method that made it: acl, acl-air, advcl, deacl, dynacl, dynacl++, dynacl-air or dynacl-air++ (default: detected from its keys; needed where several methods share a layout).", metavar="METHOD", show_default=False)] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
    **options,
) -> None:
    """Convert a published AdvCL, ACL, ACL-AIR, DynACL(++), DynACL-AIR(++) or DeACL checkpoint
    into an advcl encoder; print its path (--out, default FILE's name with .safetensors).
    --dataset is the one it was pretrained on, recorded in the encoder's metadata.

    The file is read with torch.load(weights_only=True): no code in it runs. Its layout is
    detected from the keys (AdvCL: bn_list.2, head_proj, fc_XXX; DynACL: encoder_k.; DeACL:
    backbone.); ACL, ACL-AIR, DynACL and DynACL-AIR share one layout, DynACL++ and DynACL-AIR++
    another: name the method with --from, since it picks the finetuning protocol. Every tensor
    must map onto the advcl model, or be dropped by name (heads and networks that are not the
    encoder, listed on stderr), otherwise the import fails and lists what did not match. BN
    sets 0/1/2 become normal/pgd/pgd_ce; the input normalisation goes into the model.

    Example:

    \b
      advcl import checkpoint/AdvCL_Cifar10/epoch_1000.ckpt \\
        --out advcl-cifar10.safetensors
      advcl import DynACL++.pt --from dynacl++
      advcl finetune advcl-cifar10.safetensors --scheme slf
    """
    from ..settings.layering import resolve
    from ..data.registry import num_classes_of
    from ..importer import import_original, source_named

    output = Output(json_output)
    settings = resolve(ImportSettings, options, config_file=config, warn=output.warn)
    num_classes_of(settings.dataset)  # an unknown dataset or method is refused before anything is read
    if source is not None:
        source_named(source)
    target = settings.out or Path(file.name).with_suffix(".safetensors")
    check_output(target, force, "--out", {"the checkpoint being imported": file})
    notes: list[str] = []
    path = import_original(file, target, dataset=settings.dataset, source=source, notes=notes)
    for note in notes:
        output.log(note)
    if json_output:
        from ..checkpoint import read_metadata

        output.document({"path": str(path), **read_metadata(path).model_dump(mode="json")})
    else:
        output.result(path)


with_options(import_checkpoint, settings_options(ImportSettings))
