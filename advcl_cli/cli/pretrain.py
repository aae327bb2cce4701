"""`advcl pretrain`: its options are the run's settings plus every method's, one panel per method.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from ..settings import PretrainSettings
from .helpcache import cached
from .options import ConfigOpt, ForceOpt, JsonOpt, option_spec, settings_options, spec_parameter, with_options

DOC = """Pretrain an encoder with one of the methods below; print the encoder checkpoint's path.

    The run folder gets encoder.safetensors, state.safetensors (resume state, every epoch) and
    metrics.jsonl (one line per epoch). Progress goes to stderr. A finished run folder is not
    overwritten without --force; an interrupted run (Ctrl-C, SIGTERM, a crash) continues with
    the same command plus --resume. Each method's options are in its panel; the training
    options' defaults are the method's own.

    Example, offline in about a minute on a CPU:

    \b
      advcl pretrain --dataset digits --arch resnet18-tiny --epochs 2 \\
        --batch-size 64 --out runs/first

    AdvCL with pseudo labels from a SimCLR encoder, then resuming after an interruption:

    \b
      enc=$(advcl pretrain -d cifar10 --method simclr --epochs 100)
      advcl pseudo-labels --encoder $enc -d cifar10 --out labels.safetensors
      advcl pretrain -d cifar10 --pseudo-labels labels.safetensors --out runs/advcl
      advcl pretrain -d cifar10 --pseudo-labels labels.safetensors --out runs/advcl --resume

    DeACL, distilling a SimCLR teacher (about a twentieth of ACL's compute beyond it):

    \b
      advcl pretrain -d cifar10 --method deacl --teacher $enc

    DynACL with the authors' momentum encoder, then DynACL++'s post-processing:

    \b
      enc=$(advcl pretrain -d cifar10 --method dynacl --out runs/dynacl)
      advcl lpaft $enc --out runs/dynacl++
    """

TRAINING_PANEL = "Training (defaults are the method's)"


def method_params() -> dict:
    """Options of every method (``option_spec``s): the shared training fields once, the others
    in one panel per group of methods that share them; and the methods' list for the help text.
    Plain data, which the help cache keeps."""
    from ..methods import check_options
    from ..methods import methods as loaded
    from ..methods.base import TrainSettings

    check_options()
    methods = loaded()
    owners: dict[str, list[str]] = {}
    for name, cls in methods.items():
        for field in cls.Settings.model_fields:
            owners.setdefault(field, []).append(name)
    params = []
    for field, names in owners.items():
        info = methods[names[0]].Settings.model_fields[field]
        if (info.json_schema_extra or {}).get("flag", True) is False:
            continue
        shown = {n: methods[n].Settings.model_fields[field].default for n in names}
        defaults = None
        if len({repr(v) for v in shown.values()}) > 1:
            from .options import format_default, is_eps

            defaults = ", ".join(f"{n} {format_default(v, is_eps(info))}" for n, v in shown.items())
        panel = TRAINING_PANEL if field in TrainSettings.model_fields else f"Options of {', '.join(names)}"
        params.append(option_spec(field, info, panel=panel, defaults=defaults))
    width = max(map(len, methods))
    listing = "\n".join(f"      {name:<{width}} {cls.summary}" for name, cls in methods.items())
    return {"specs": params, "listing": f"\n    Methods (--method):\n\n    \b\n{listing}\n"}


def command(full: bool):
    """The `advcl pretrain` function; ``full`` adds the methods' options (importing every
    method, hence torch), which only `advcl pretrain` itself needs."""

    def pretrain(force: ForceOpt = False, config: ConfigOpt = None,
                 json_output: JsonOpt = False, **options) -> None:
        from ..engine.pretrain import RESUME_MAY_CHANGE, default_run_dir
        from ..engine.pretrain import pretrain as run_pretrain
        from .training import resolve_run_settings, resume_command, run_and_print

        settings = resolve_run_settings(PretrainSettings, config, options, run_dir=default_run_dir,
                                        may_change=RESUME_MAY_CHANGE)
        run_dir = settings.out or default_run_dir(settings)
        run_and_print(run_pretrain, settings, json_output=json_output, force=force, run_dir=run_dir,
                      command=resume_command("pretrain", run_dir))

    found = cached("pretrain", method_params) if full else {"specs": [], "listing": ""}
    params, listing = [spec_parameter(spec) for spec in found["specs"]], found["listing"]
    pretrain.__doc__ = DOC.replace("\n    Example,", listing + "\n    Example,", 1) if listing else DOC
    return with_options(pretrain, settings_options(PretrainSettings) + params)
