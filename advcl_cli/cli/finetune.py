"""`advcl finetune`: SLF, ALF or AFF finetuning of an encoder (or classifier) checkpoint.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from ..settings import FinetuneSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, ModelArg, ResumeOpt, model_path, settings_options, with_options


def finetune(checkpoint: ModelArg = None, resume: ResumeOpt = False, force: ForceOpt = False, config: ConfigOpt = None,
             json_output: JsonOpt = False, **options) -> None:
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
    from ..checkpoint import load_checkpoint
    from ..engine.finetune import RESUME_MAY_CHANGE, default_run_dir
    from ..engine.finetune import finetune as run_finetune
    from .training import resolve_run_settings, run_and_print

    parent = load_checkpoint(model_path(checkpoint))
    settings = resolve_run_settings(FinetuneSettings, config, options, resume=resume,
                                    run_dir=lambda probe: default_run_dir(probe, parent), may_change=RESUME_MAY_CHANGE)
    run_and_print(run_finetune, settings, parent, json_output=json_output, resume=resume, force=force, summary=_summary)


with_options(finetune, settings_options(FinetuneSettings))


def _summary(m: dict) -> str:
    return (f"test ({m.get('n_eval')} images): clean {100 * m.get('clean_acc', 0):.2f}%, "
            f"PGD-20 {100 * m.get('pgd20_acc', 0):.2f}% at eps {m.get('eps', 0) * 255:.3g}/255")
