"""`advcl lpaft`: DynACL++'s post-processing of a pretrained encoder (pseudo labels, linear
probing, TRADES), printing the new encoder's path.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from ..settings import LpaftSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, ModelArg, model_path, settings_options, with_options


def lpaft(encoder: ModelArg = None, force: ForceOpt = False, config: ConfigOpt = None,
          json_output: JsonOpt = False, **options) -> None:
    """DynACL++: post-process a pretrained encoder on pseudo labels; print the new encoder's path.

    LPAFT as in the authors' code: k-means (10 clusters) on the encoder's features of the
    un-augmented training split (the normal BN set), then on those pseudo labels 10 epochs of
    linear probing (encoder frozen) and 25 epochs of TRADES (no random start) on the pgd route,
    which becomes a single-BN encoder (--dual-bn keeps the normal set too, for AFF with both).
    The result is an encoder (method dynacl++) that advcl finetune takes with any scheme.
    The run folder (--out, default runs/METHOD++-DATASET-SHA8) gets encoder.safetensors,
    pseudo-labels.safetensors, state.safetensors
    (resume state, every epoch) and metrics.jsonl. ENCODER may be a path, a zoo name, or '-' /
    omitted to read a path from stdin. --batch-size serves both phases (the last partial batch is
    dropped); TRADES' attack (--eps, --attack-steps, --attack-step-size) is L-inf and starts at x.

    Example, offline on digits:

    \b
      enc=$(advcl pretrain -d digits --arch resnet18-tiny --method dynacl \\
        --epochs 5 --batch-size 64)
      enc2=$(advcl lpaft $enc --probe-epochs 2 --epochs 2 --batch-size 64)
      advcl finetune $enc2 --scheme slf --epochs 2 | advcl eval --attack pgd20

    The authors' recipe on CIFAR-10, then the three schemes:

    \b
      enc=$(advcl pretrain -d cifar10 --method dynacl --out runs/dynacl)
      enc2=$(advcl lpaft $enc --out runs/dynacl++)
      for s in slf alf aff; do advcl finetune $enc2 --scheme $s; done
    """
    from ..checkpoint import load_checkpoint
    from ..engine.lpaft import default_run_dir
    from ..engine.lpaft import lpaft as run_lpaft
    from .training import resolve_run_settings, resume_command, run_and_print

    parent = load_checkpoint(model_path(encoder, config))
    settings = resolve_run_settings(LpaftSettings, config, options, run_dir=lambda probe: default_run_dir(probe, parent))
    run_dir = settings.out or default_run_dir(settings, parent)
    run_and_print(run_lpaft, settings, parent, json_output=json_output, force=force,
                  run_dir=run_dir, command=resume_command("lpaft", run_dir, parent.path))


with_options(lpaft, settings_options(LpaftSettings))
