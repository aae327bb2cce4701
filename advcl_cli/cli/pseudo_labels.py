"""`advcl pseudo-labels` (make ClusterFit labels) and `advcl pseudo-labels import` (the authors' pickle).

No ``from __future__ import annotations`` here: Typer reads the option aliases at definition.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..settings import ImportSettings, PseudoLabelSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, check_output, settings_options, with_options
from .output import Output

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})



@app.callback(invoke_without_command=True)
def pseudo_labels(
    ctx: typer.Context,
    encoder: Annotated[
        Optional[str],
        typer.Option("--encoder", "-e", help="Encoder checkpoint (path, zoo name, or '-' for a path on stdin).", show_default=False),
    ] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
    **options,
) -> None:
    """ClusterFit pseudo labels for AdvCL: k-means on an encoder's features; print the file's path
    (--out, default pseudo-labels-DATASET.safetensors).

    Features of the training split (--batch-size images at a time) are L2-normalised and
    clustered with scikit-learn's k-means, once per k. The file holds one int64 label vector per
    k (tensor k2, k10, ...) and records the dataset, its size and the encoder's sha256. Use it
    with advcl pretrain --pseudo-labels.

    Example, on the offline digits data:

    \b
      enc=$(advcl pretrain -d digits --arch resnet18-tiny --method simclr \\
        --epochs 5 --batch-size 64)
      advcl pseudo-labels --encoder $enc -d digits --k 2,10,50 \\
        --out digits-labels.safetensors
      advcl pretrain -d digits --arch resnet18-tiny \\
        --pseudo-labels digits-labels.safetensors \\
        --epochs 5 --batch-size 64 --out runs/advcl-labels

    The authors' CIFAR-10 labels: advcl pseudo-labels import imagenet_clPretrain_pseudo_labels.pkl
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..settings.layering import resolve
    from ..pseudolabels import default_labels_path, make_pseudo_labels
    from .options import model_path

    output = Output(json_output)
    settings = resolve(PseudoLabelSettings, options, config_file=config, warn=output.warn)
    out = settings.out or default_labels_path(settings.dataset)
    path = model_path(encoder, config)
    check_output(out, force, "--out", {"the encoder": path})
    reporter = output.reporter()
    try:
        result = make_pseudo_labels(settings, path, out, reporter)
    finally:
        reporter.finish()
    _print(output, result, json_output)


with_options(pseudo_labels, settings_options(PseudoLabelSettings))


@app.command("import")
def import_pickle(
    file: Annotated[Path, typer.Argument(help="The authors' pickle (imagenet_clPretrain_pseudo_labels.pkl).", show_default=False)],
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
    **options,
) -> None:
    """Convert the authors' CIFAR-10 pseudo-label pickle into a labels file; print its path (--out,
    default FILE's name with .safetensors).

    The pickle goes through a restricted unpickler that admits only numpy arrays; anything else
    (code, objects) is refused before it runs. Only the train labels (pseudo_train_K) are kept;
    --dataset is the one they are for.

    Example:

    \b
      advcl pseudo-labels import imagenet_clPretrain_pseudo_labels.pkl \\
        --out cifar10-labels.safetensors
      advcl pretrain -d cifar10 --pseudo-labels cifar10-labels.safetensors
    """
    from ..settings.layering import resolve
    from ..data.registry import num_classes_of
    from ..pseudolabels import import_authors_pickle

    output = Output(json_output)
    settings = resolve(ImportSettings, options, config_file=config, warn=output.warn)
    num_classes_of(settings.dataset)  # an unknown dataset is refused before anything is read
    target = settings.out or Path(file.name).with_suffix(".safetensors")
    check_output(target, force, "--out", {"the pickle being imported": file})
    result = import_authors_pickle(file, target, dataset=settings.dataset)
    _print(output, result, json_output)


with_options(import_pickle, settings_options(ImportSettings))


def _print(output: Output, path: Path, json_output: bool) -> None:
    if json_output:
        from ..pseudolabels import load_labels

        labels = load_labels(path)
        output.document({"path": str(path), **labels.meta})
    else:
        output.result(path)
