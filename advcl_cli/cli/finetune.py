"""`advcl finetune`: SLF, ALF or AFF finetuning of an encoder (or classifier) checkpoint.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from ..report import listing
from ..settings import FinetuneSettings
from .helpcache import cached
from .options import ConfigOpt, ForceOpt, JsonOpt, ModelArg, model_path, settings_options, with_options

PROTOCOL_NOTE = (
    "Epochs, batch size, lr and milestones default to the RobustSSL protocol for the encoder's method "
    "(the method recorded in its checkpoint); flags, the config file and ADVCL_* variables override them."
)


def finetune(checkpoint: ModelArg = None, force: ForceOpt = False, config: ConfigOpt = None,
             json_output: JsonOpt = False, **options) -> None:
    """Finetune a pretrained encoder into a classifier; print the classifier's path.

    PROTOCOL

    The run folder (--out, default runs/METHOD-SCHEME-DATASET-SHA8) gets classifier.safetensors, state.safetensors (resume state, every epoch)
    and metrics.jsonl. The classifier's metadata records the scheme and its settings, the
    parent checkpoint's sha256, and the test clean and PGD-20 accuracy measured at the end
    (fractions: clean_acc, pgd20_acc, n_eval). The test split is never used to pick an epoch.
    CHECKPOINT may be a path, a zoo name, or '-' / omitted to read a path from stdin. --eps is the
    budget of the training attack (alf, aff) and of the final PGD-20; --trades-beta is aff's.

    Example, offline on digits:

    \b
      enc=runs/advcl-digits-resnet18-tiny/encoder.safetensors  # the quick start's
      advcl finetune $enc --scheme slf --epochs 5

    Adversarial full finetuning with a held-out validation split, then evaluation:

    \b
      clf=$(advcl finetune $enc --scheme aff --val-fraction 0.1)
      advcl eval $clf --attack pgd20 --attack autoattack --limit 20
    """
    from ..checkpoint import load_checkpoint
    from ..engine.finetune import default_run_dir
    from ..engine.finetune import finetune as run_finetune
    from .training import resolve_run_settings, resume_command, run_and_print

    parent = load_checkpoint(model_path(checkpoint, config))
    settings = resolve_run_settings(FinetuneSettings, config, options, run_dir=lambda probe: default_run_dir(probe, parent))
    run_dir = settings.out or default_run_dir(settings, parent)
    run_and_print(run_finetune, settings, parent, json_output=json_output, force=force, summary=_summary,
                  run_dir=run_dir, command=resume_command("finetune", run_dir, parent.path))


DOC = finetune.__doc__


def protocol_help() -> str:
    """The protocol's defaults and each method's own, for the help text (imports the methods)."""
    from ..engine.finetune import PROTOCOL, SCHEMES
    from ..methods import methods

    def one(key: str, value) -> str:
        if key == "milestones":
            return ",".join(map(str, value)) or "none"
        if key == "dual_bn":
            return "on (clean images through the normal BN set, adversarial ones through pgd)" if value else "off"
        return str(value)

    def describe(values: dict) -> str:
        parts = []
        for key, value in values.items():
            if isinstance(value, dict):  # per place: "v on place", the "*" value last
                value = ", ".join(f"{one(key, v)} on {d}" for d, v in value.items() if d != "*") + (
                    f", else {one(key, value['*'])}" if "*" in value else "")
            else:
                value = one(key, value)
            if key != "dual_bn" or value != "off":
                parts.append(f"{key.replace('_', ' ')} {value}")
        return ", ".join(parts)

    rows = [("every method", f"{scheme}: {describe(PROTOCOL[scheme])}") for scheme in SCHEMES]
    for name, cls in methods().items():
        for label, own in ((name, cls.finetune_protocol), *cls.alias_protocols.items()):
            rows += [(label, f"{scheme}: {describe(values)}") for scheme, values in own.items()]
    return "\n\n    \b\n" + listing(rows)


def command(full: bool):
    """`advcl finetune`; ``full`` lists each method's protocol in the help (importing them)."""
    protocols = cached("finetune", protocol_help) if full else ""
    finetune.__doc__ = DOC.replace("PROTOCOL", PROTOCOL_NOTE + protocols, 1)
    return with_options(finetune, settings_options(FinetuneSettings))


def _summary(m: dict) -> str | None:
    if "clean_acc" not in m:  # --eval-limit 0
        return None
    return (f"test ({m.get('n_eval')} images): clean {100 * m.get('clean_acc', 0):.2f}%, "
            f"PGD-20 {100 * m.get('pgd20_acc', 0):.2f}% at eps {m.get('eps', 0) * 255:.3g}/255")
