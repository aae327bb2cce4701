"""One training run's lifecycle, the one home of what pretrain, finetune and lpaft share.

In order: device and precision (``Runtime``) -> the process group -> the run folder locked and
checked (``open_run``) -> on resume the stored settings compared (``check_resume_config``, the one
use of the settings' ``resume_may_change`` rule) -> "already finished" (``finished``/``finished_result``) ->
the engine builds its data, model and optimizer -> ``restore`` -> ``begin`` (the folder created or
cleared) -> the start banner -> the epochs (``loop`` makes the shared ``Loop``) -> the process group
left when the ``with`` block ends normally. Each engine keeps only what differs: its checks, its
build, its step and its end of epoch (and ``state_of(epochs_done)``: what its resume state holds).

``resume`` is False (a fresh run), True (continue the run in the folder) or "auto" (continue it
when the folder holds one, else start; a finished one with the same settings is "already
finished"). Between two steps the run may stop (``engine.stop``: SIGTERM, SIGUSR1, Slurm's
requeue, ``--save-every-minutes``): rank 0 then saves a mid-epoch state, the resume state of the
last finished epoch plus ``extra["position"]`` (the epoch, the next step, the epoch's random
stream, every rank's sums of the loss terms so far), from which a resumed run takes the next step
exactly as an uninterrupted one would.

A failure leaves the process group as it is (a rank may be gone: a barrier could hang); the run
folder's lock is released by ``holds_run_folder`` whatever happens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..device import runtime_of
from ..distributed import init_distributed, on_main, shutdown
from ..report import Reporter, plural
from .loop import Loop
from .run import RunDir, RunResult, begin_run, check_resume_config, open_run, restore
from .stop import GO, SAVE, Stops

RESUME_MODES = {"off": False, "on": True, "auto": "auto"}  # the ``resume`` setting -> ``open_run``'s resume


class Lifecycle:
    """The shared start and end of one training run in ``run`` (a ``RunDir``); ``reporter`` is
    silenced on every rank but 0. Use as a context manager: a normal exit leaves the process group."""

    def __init__(self, settings, run: RunDir, reporter: Reporter | None, *, resume: bool | str | None, force: bool):
        """``resume`` None: the settings' ``resume`` (off, on, auto)."""
        self.settings, self.run = settings, run
        if resume is None:
            resume = RESUME_MODES[getattr(settings, "resume", "off")]
        self.runtime = runtime_of(settings)
        self.ctx = init_distributed(self.runtime.device)
        self.reporter = (reporter or Reporter()) if self.ctx.is_main else Reporter()
        self.config = settings.to_config()
        self.state = open_run(run, self.ctx, batch_size=settings.batch_size, resume=resume, force=force)
        self.position = None  # where a mid-epoch state stopped
        if self.state is not None:
            check_resume_config(self.state["config"], self.config, settings.resume_may_change())
            self.position = self.state["extra"].pop("position", None)
        self.start = 0  # epochs done before this process trains (``restore``)
        self.metrics: dict = {}  # the last finished epoch's metrics (``loop``'s end of epoch)
        self.stops = Stops(self.ctx, getattr(settings, "save_every_minutes", None))
        self.stopped = False  # every rank stopped together (``between``)

    def __enter__(self) -> "Lifecycle":
        self.stops.__enter__()
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.stops.__exit__()
        if kind is None or self.stopped:  # every rank got here: leave the process group together
            shutdown(self.ctx)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def extra(self) -> dict:
        """The stored run's extra entries (empty for a fresh run)."""
        return self.state["extra"] if self.state is not None else {}

    def finished(self, needs: str | None = None) -> bool:
        """Whether the folder holds a finished run (with the ``needs`` extra entry, when given)."""
        return self.state is not None and bool(self.state.get("finished")) and (needs is None or needs in self.extra)

    def finished_result(self, artifact: str, metrics: dict | None = None) -> RunResult:
        """The result of the finished run in the folder, said once; ``metrics`` defaults to its
        last logged epoch's."""
        epochs = int(self.state["epoch"])
        self.reporter.log(f"{self.run.path} already finished all {epochs} epochs")
        if metrics is None:
            metrics = self.last_logged()
        return RunResult(self.run.artifact(artifact), self.run.path, epochs, metrics, self.is_main,
                         runtime=self.extra.get("runtime", {}))

    def last_logged(self) -> dict:
        return (self.run.read_metrics() or [{}])[-1]

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Weights, optimizer and RNG states from the resume state; the epochs done (0: fresh)."""
        if self.state is not None:
            self.start = restore(self.state, model, optimizer)
        return self.start

    def begin(self) -> None:
        """Every check passed: the folder is created (or cleared), a resumed log cut back."""
        begin_run(self.run, self.ctx, self.state, self.settings)
        self.metrics = self.last_logged() if self.start else {}

    def banner(self, doing: str, what: str) -> None:
        """The start line: ``doing`` (or "resuming after epoch N") and ``what`` is trained."""
        head = f"resuming after epoch {self.start}" if self.start else doing
        if self.position is not None:
            head = f"resuming after epoch {self.start} and {plural(self.position['step'], 'step')} of the next"
        self.reporter.log(f"{head}: {what}, {self.runtime.describe()} -> {self.run.path}")

    def loop(self, **kwargs) -> Loop:
        """The shared epoch loop with this run's seed, device, precision, process group and reporter."""
        return Loop(seed=self.settings.seed, device=self.device, precision=self.runtime.precision, ctx=self.ctx,
                    reporter=self.reporter, **kwargs)

    def train(self, loop: Loop, first: int, end: int, end_epoch, state_of) -> None:
        """Epochs ``max(start, first)`` .. ``end - 1`` of ``loop``; ``end_epoch(done, metrics)`` after
        each, then its metrics become ``self.metrics``. ``state_of(done)`` is what ``RunDir.save_state``
        takes for the state after ``done`` epochs (a mid-epoch state adds its position)."""
        def after(done: int, metrics: dict) -> None:
            end_epoch(done, metrics)
            self.metrics = metrics

        if self.start >= end:
            return
        loop.position = self.position
        loop.between = lambda step, position: self.between(step, position, state_of)
        self.stops.armed = True
        try:
            loop.run(max(self.start, first), end, after)
        finally:
            self.stops.armed = False

    def between(self, step: int | None, position, state_of) -> None:
        """Between two steps (``step`` done, 1-based over the run) or two epochs (``step`` None,
        the state just saved): save and go on, or save and stop, when a rank was asked to."""
        decision = self.stops.decide(step)
        if decision == GO:
            return
        if position is not None:  # every rank takes part (the sums are gathered), rank 0 writes
            where = position()
            on_main(lambda: self.save_position(state_of, where), self.ctx)
            self.reporter.log(f"saved the state at epoch {where['epoch'] + 1}, step {where['step']} in {self.run.state_path}")
        self.stops.saved()
        if decision != SAVE:
            self.stopped = True
            at = f"at epoch {where['epoch'] + 1}, step {where['step']}" if position is not None else "after an epoch"
            self.stops.stop(decision, at)

    def save_position(self, state_of, position: dict) -> None:
        kwargs = state_of(position["epoch"])
        self.run.save_state(**{**kwargs, "extra": {**kwargs["extra"], "position": position}}, finished=False)

    def result(self, path: Path, epochs: int, metrics: dict | None = None) -> RunResult:
        return RunResult(path, self.run.path, epochs, self.metrics if metrics is None else metrics, self.is_main,
                         runtime=self.runtime.record())
