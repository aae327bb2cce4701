"""What `advcl pretrain` and `advcl finetune` share: settings for a resumed run, running the
engine, and printing its result."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable

from .output import Output


def resolve_run_settings(settings_cls, config: Path | None, options: dict, *, resume: bool,
                         run_dir: Callable, may_change: set[str]):
    """The settings of a run. On --resume the run's stored settings are the base (above the
    config file and the environment) and the flags given may only change how it runs
    (device, precision, ...): ``check_resume_config`` refuses the others."""
    from ..config import resolve
    from ..engine.run import RunDir

    warn = Output().warn
    base = None
    if resume:  # the folder first: its settings are the base of the rest
        own = {k: v for k, v in options.items() if k in settings_cls.model_fields}
        probe = resolve(settings_cls, own, config_file=config)
        stored = RunDir(probe.out or run_dir(probe)).stored_config() or {}
        base = {k: v for k, v in stored.items() if k not in may_change and v is not None}
    return resolve(settings_cls, options, config_file=config, base=base, warn=warn)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's preemption, torchrun stopping a job) ends a training run like
    Ctrl-C: the last saved epoch is kept and the command exits 130."""
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


def run_and_print(engine: Callable, settings, *args, json_output: bool, resume: bool, force: bool,
                  summary: Callable[[dict], str | None] = lambda m: None) -> None:
    """Run a training engine with progress on stderr; rank 0 prints the model's path (or JSON)."""
    output = Output(json_output)
    reporter = output.reporter()
    try:
        with sigterm_as_interrupt():
            result = engine(settings, *args, reporter, resume=resume, force=force)
    finally:
        reporter.finish()
    if not result.is_main:  # another rank of a torchrun job: rank 0 prints
        return
    line = summary(result.metrics) if result.metrics else None
    if line:
        output.log(line)
    if json_output:
        output.document({"path": str(result.path), "run_dir": str(result.run_dir), "epochs": result.epochs,
                         "metrics": result.metrics})
    else:
        output.result(result.path)
