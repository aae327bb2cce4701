"""What `advcl pretrain` and `advcl finetune` share: settings for a resumed run, running the
engine, and printing its result."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Callable

from ..errors import DiskError, Interrupted, Requeued
from .output import Output


def resolve_run_settings(settings_cls, config: Path | None, options: dict, *, run_dir: Callable):
    """The settings of a run. On resume (``--resume``, or ``--resume auto`` when the folder holds a
    run) the run's stored settings are the base: every one that no flag, ``ADVCL_*`` variable or
    config file gives is carried over, and those may only change how it runs
    (``SettingsModel.resume_may_change``: device, precision, ...); any other change is refused by
    name, whichever layer it comes from (``settings.layering.check_unchanged``)."""
    from ..settings.layering import resolve
    from ..engine.run import RunDir

    warn = Output().warn
    own = {k: v for k, v in options.items() if k in settings_cls.model_fields}
    probe = resolve(settings_cls, own, config_file=config)
    base = None
    if probe.resume == "on":  # the folder first: its settings are the base of the rest
        base = RunDir(probe.out or run_dir(probe)).stored_config() or {}
    elif probe.resume == "auto":  # the same, when there is a run to continue
        base = RunDir(probe.out or run_dir(probe)).stored_config()
    return resolve(settings_cls, options, config_file=config, base=base, warn=warn)


def bare_resume(args: list[str]) -> list[str]:
    """A bare ``--resume`` (no on, off or auto after it) means ``--resume on``, the flag it always was."""
    out = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--resume" and (i + 1 == len(args) or args[i + 1].lower() not in ("on", "off", "auto")):
            out[i] = "--resume=on"
    return out


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's preemption, torchrun stopping a job) ends a training run like
    Ctrl-C: the last saved state is kept and the command exits 130. While the epochs run the
    engine handles it itself (``engine.stop``: a mid-epoch state first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(verb: str, run_dir: Path, *args: str | Path) -> str:
    """The exact command that continues the run in ``run_dir`` (its stored settings are the
    rest); under torchrun, the same arguments for the same torchrun command."""
    cmd = " ".join(shlex.quote(str(a)) for a in ("advcl", verb, *args, "--out", run_dir, "--resume"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"the same torchrun command with `{cmd.removeprefix('advcl ')}`"
    return cmd


def continue_hint(run_dir: Path, command: str) -> str:
    """What to do after a run stopped early: resume it when an epoch was saved, else start again."""
    from ..engine.run import STATE_FILE

    if (Path(run_dir) / STATE_FILE).is_file():
        return f"continue it from its last saved epoch: {command}"
    return "no epoch was saved yet: run the same command again (the run folder is reused)"


def run_and_print(engine: Callable, settings, *args, json_output: bool, force: bool, run_dir: Path,
                  command: str, summary: Callable[[dict], str | None] = lambda m: None) -> None:
    """Run a training engine (``settings.resume`` says whether it resumes) with progress on
    stderr; rank 0 prints the model's path (or JSON). An interruption (Ctrl-C, SIGTERM) or a
    full disk ends it with the command (``command``, from ``resume_command``) that continues the
    run in ``run_dir``; a run that requeued its Slurm job says so and exits 0."""
    output = Output(json_output)
    reporter = output.reporter()
    try:
        with sigterm_as_interrupt():
            result = engine(settings, *args, reporter, force=force)
    except Requeued as e:
        reporter.finish()
        if int(os.environ.get("RANK", "0")) == 0:
            output.log(e.message)
        return
    except KeyboardInterrupt:
        raise Interrupted("interrupted", continue_hint(run_dir, command)) from None
    except DiskError as e:
        e.hint = f"{e.hint}; then {continue_hint(run_dir, command)}"
        raise
    finally:
        reporter.finish()
    if not result.is_main:  # another rank of a torchrun job: rank 0 prints
        return
    line = summary(result.metrics) if result.metrics else None
    if line:
        output.log(line)
    if json_output:
        output.document({"path": str(result.path), "run_dir": str(result.run_dir), "epochs": result.epochs,
                         "metrics": result.metrics, "runtime": result.runtime})
    else:
        output.result(result.path)
