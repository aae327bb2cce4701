"""`advcl finetune`: SLF, ALF or AFF finetuning of an encoder (or classifier) checkpoint.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ConfigOpt, DataDirOpt, DatasetOpt, DeviceOpt, EpsOpt, ImageSizeOpt, JsonOpt, LimitOpt, ModelArg, SeedOpt, model_path


def _opt(*names: str, help: str, typ=Optional[str]):
    return Annotated[typ, typer.Option(*names, help=help, show_default=False)]


def finetune(
    checkpoint: ModelArg = None,
    scheme: _opt("--scheme", "-s", help="slf (frozen encoder, clean images; default), alf (frozen encoder, PGD-10 images) or aff (whole network, TRADES).") = None,
    dataset: DatasetOpt = None,
    epochs: _opt("--epochs", help="Epochs (default 25).", typ=Optional[int]) = None,
    batch_size: _opt("--batch-size", "-b", help="Batch size (default 512 for slf/alf, 128 for aff).", typ=Optional[int]) = None,
    lr: _opt("--lr", help="Learning rate (default 0.01 for slf/alf, 0.1 for aff).", typ=Optional[float]) = None,
    milestones: _opt("--milestones", help="Epochs where lr is multiplied by 0.1 (default 10,20 for slf/alf, 15,20 for aff).") = None,
    weight_decay: _opt("--weight-decay", help="Weight decay (default 2e-4).", typ=Optional[float]) = None,
    eps: EpsOpt = None,
    attack_steps: _opt("--attack-steps", help="PGD steps of the training attack (alf, aff; default 10).", typ=Optional[int]) = None,
    trades_beta: _opt("--trades-beta", help="TRADES beta (aff; default 6).", typ=Optional[float]) = None,
    val_fraction: _opt("--val-fraction", help="Hold out this part of the training split and keep the epoch with the best PGD-20 accuracy on it (default 0: keep the last epoch).", typ=Optional[float]) = None,
    bn_set: _opt("--bn-set", help="The encoder's batch-norm set to start from (default pgd; an encoder without it uses its only set).") = None,
    eval_limit: _opt("--eval-limit", help="Test images for the final clean / PGD-20 accuracy (default all).", typ=Optional[int]) = None,
    out: _opt("--out", "-o", help="Run folder (default runs/METHOD-SCHEME-DATASET-SHA8).", typ=Optional[Path]) = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the --out folder from its last saved epoch.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run already in the --out folder.")] = False,
    precision: _opt("--precision", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.") = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    limit: LimitOpt = None,
    image_size: ImageSizeOpt = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Finetune a pretrained encoder into a classifier; print the classifier's path.

    The run folder gets classifier.safetensors, state.safetensors (resume state, every epoch)
    and metrics.jsonl. The classifier's metadata records the scheme and its settings, the
    parent checkpoint's sha256, and the test clean and PGD-20 accuracy measured at the end
    (fractions: clean_acc, pgd20_acc, n_eval). The test split is never used to pick an epoch.
    CHECKPOINT may be a path, a zoo name, or '-' / omitted to read a path from stdin.

    Example, offline on digits:

    \b
      advcl finetune runs/advcl-digits-resnet18-tiny/encoder.safetensors --scheme slf --epochs 5

    Adversarial full finetuning with a held-out validation split, then evaluation:

    \b
      clf=$(advcl finetune encoder.safetensors --scheme aff --val-fraction 0.1)
      advcl eval $clf --attack pgd20 --attack autoattack
    """
    from ..engine.finetune import RESUME_MAY_CHANGE, default_run_dir
    from ..engine.finetune import finetune as run_finetune
    from ..checkpoint import load_checkpoint
    from ..settings import FinetuneSettings
    from .training import resolve_run_settings, run_and_print

    flags = dict(
        scheme=scheme, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr, milestones=milestones,
        weight_decay=weight_decay, eps=eps, attack_steps=attack_steps, trades_beta=trades_beta,
        val_fraction=val_fraction, bn_set=bn_set, eval_limit=eval_limit, out=out, precision=precision,
        device=device, seed=seed, limit=limit, image_size=image_size, data_dir=data_dir,
    )
    given = {k: v for k, v in flags.items() if v is not None}
    parent = load_checkpoint(model_path(checkpoint))
    settings = resolve_run_settings(FinetuneSettings, config, given, resume=resume,
                                    run_dir=lambda probe: default_run_dir(probe, parent), may_change=RESUME_MAY_CHANGE)
    run_and_print(run_finetune, settings, parent, json_output=json_output, resume=resume, force=force, summary=_summary)


def _summary(m: dict) -> str:
    return (f"test ({m.get('n_eval')} images): clean {100 * m.get('clean_acc', 0):.2f}%, "
            f"PGD-20 {100 * m.get('pgd20_acc', 0):.2f}% at eps {m.get('eps', 0) * 255:.3g}/255")
