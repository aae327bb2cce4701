"""`advcl pretrain` and `advcl import`.

No ``from __future__ import annotations`` here: the ``_opt(...)`` option aliases must be
evaluated when the functions are defined.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ConfigOpt, DataDirOpt, DatasetOpt, DeviceOpt, EpsOpt, ImageSizeOpt, JsonOpt, LimitOpt, SeedOpt, refuse_overwrite
from .output import Output


def _opt(*names: str, help: str, typ=Optional[str]):
    return Annotated[typ, typer.Option(*names, help=help, show_default=False)]


def pretrain(
    dataset: DatasetOpt = None,
    method: _opt("--method", "-m", help="advcl (default) or simclr.") = None,
    arch: _opt("--arch", help="resnet18 (default) or resnet18-tiny.") = None,
    epochs: _opt("--epochs", help="Epochs (default 1000).", typ=Optional[int]) = None,
    batch_size: _opt("--batch-size", "-b", help="Global batch size (default 512).", typ=Optional[int]) = None,
    drop_last: Annotated[bool, typer.Option("--drop-last", help="Drop each epoch's last partial batch (default: keep it, as the reference does).")] = False,
    lr: _opt("--lr", help="Peak learning rate (default 0.5).", typ=Optional[float]) = None,
    warmup_epochs: _opt("--warmup-epochs", help="Linear warm-up epochs (default 10 when the batch exceeds 256, else 0).", typ=Optional[int]) = None,
    eps: EpsOpt = None,
    pgd_steps: _opt("--pgd-steps", help="PGD steps of the attack (default 5).", typ=Optional[int]) = None,
    pgd_step_size: _opt("--pgd-step-size", help="PGD step size (default 2/255).") = None,
    temperature: _opt("--temperature", help="Contrastive temperature (default 0.5).", typ=Optional[float]) = None,
    base_temperature: _opt("--base-temperature", help="The loss is scaled by temperature / base-temperature (default 0.07).", typ=Optional[float]) = None,
    ce_weight: _opt("--ce-weight", help="Weight of the pseudo-label term (default 0.2).", typ=Optional[float]) = None,
    hfc_radius: _opt("--hfc-radius", help="Radius of the high-frequency view's low-pass cut (default 8).", typ=Optional[float]) = None,
    pseudo_labels: _opt("--pseudo-labels", help="Labels file from `advcl pseudo-labels` (advcl only).", typ=Optional[Path]) = None,
    out: _opt("--out", "-o", help="Run folder (default runs/METHOD-DATASET-ARCH).", typ=Optional[Path]) = None,
    save_every: _opt("--save-every", help="Save the encoder every N epochs (default 50; the resume state is saved every epoch).", typ=Optional[int]) = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the --out folder from its last saved epoch.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run already in the --out folder.")] = False,
    precision: _opt("--precision", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.") = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network (GPU).")] = False,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    limit: LimitOpt = None,
    image_size: ImageSizeOpt = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Pretrain an encoder (AdvCL or SimCLR); print the encoder checkpoint's path.

    The run folder gets encoder.safetensors, state.safetensors (resume state, every epoch) and
    metrics.jsonl (one line per epoch). Progress goes to stderr. A finished run folder is not
    overwritten without --force; an interrupted run (Ctrl-C, SIGTERM, a crash) continues with
    the same command plus --resume.

    Example, offline in about a minute on a CPU:

    \b
      advcl pretrain --dataset digits --arch resnet18-tiny --epochs 2 --batch-size 64

    AdvCL with pseudo labels from a SimCLR encoder, then resuming after an interruption:

    \b
      enc=$(advcl pretrain -d cifar10 --method simclr --epochs 100)
      advcl pseudo-labels --encoder $enc -d cifar10 --out labels.safetensors
      advcl pretrain -d cifar10 --pseudo-labels labels.safetensors --out runs/advcl
      advcl pretrain -d cifar10 --pseudo-labels labels.safetensors --out runs/advcl --resume
    """
    from ..engine.pretrain import RESUME_MAY_CHANGE, default_run_dir
    from ..engine.pretrain import pretrain as run_pretrain
    from ..settings import PretrainSettings
    from .training import resolve_run_settings, run_and_print

    flags = dict(
        dataset=dataset, method=method, arch=arch, epochs=epochs, batch_size=batch_size, drop_last=drop_last or None, lr=lr,
        warmup_epochs=warmup_epochs, eps=eps, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size,
        temperature=temperature, base_temperature=base_temperature, ce_weight=ce_weight,
        hfc_radius=hfc_radius, pseudo_labels=pseudo_labels, out=out, save_every=save_every,
        precision=precision, compile=compile or None, device=device, seed=seed, limit=limit,
        image_size=image_size, data_dir=data_dir,
    )
    given = {k: v for k, v in flags.items() if v is not None}
    settings = resolve_run_settings(PretrainSettings, config, given, resume=resume, run_dir=default_run_dir,
                                    may_change=RESUME_MAY_CHANGE)
    run_and_print(run_pretrain, settings, json_output=json_output, resume=resume, force=force)


def import_checkpoint(
    file: Annotated[Path, typer.Argument(help="The original AdvCL checkpoint (epoch_N.ckpt).", show_default=False)],
    out: _opt("--out", "-o", help="Where to write the encoder (default FILE's name with .safetensors).", typ=Optional[Path]) = None,
    dataset: _opt("--dataset", "-d", help="Dataset it was pretrained on, for the metadata (default cifar10).") = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
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
    from ..importer import import_original

    target = out or Path(file.name).with_suffix(".safetensors")
    refuse_overwrite(target, force)
    path = import_original(file, target, dataset=dataset or "cifar10")
    Output().result(path)
