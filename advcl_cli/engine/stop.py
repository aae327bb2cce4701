"""Stopping a training run between two steps, with a step-level resume state.

While the epochs run (``Stops`` is entered by ``Lifecycle.train``), SIGTERM (a scheduler's
preemption, torchrun stopping its workers) and SIGUSR1 (Slurm's ``--signal=USR1@90``) only set a
flag; after each step the ranks agree on the flags (``agree_max``: one small host-side all-reduce
per step under torchrun, nothing in one process) and, when one was raised anywhere, rank 0 saves
the mid-epoch state and every rank stops: ``Requeued`` (exit 0) after a SIGUSR1 in a Slurm job,
whose rank 0 ran ``scontrol requeue $SLURM_JOB_ID`` once; else ``KeyboardInterrupt`` (exit 130, as
Ctrl-C). ``--save-every-minutes M`` saves the same state every M minutes (rank 0's clock) and goes
on. Outside the epochs (loading data, k-means, the final evaluation) both signals interrupt at
once, keeping the last saved state.

``ADVCL_FAULT_AT_STEP`` is a test hook (the one place it is read): ``N[:SIGNAL[:RANK]]`` makes rank
RANK (default 0) send itself SIGNAL (default USR1; TERM, KILL, ...) right after the run's N-th step
(counted from the run's first step, 1-based), on torchrun's first attempt only
(``TORCHELASTIC_RESTART_COUNT`` 0), so that a test interrupts a run at a known step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from ..distributed import DistContext, agree_max, on_main
from ..errors import Requeued, TrainingError

FAULT_ENV = "ADVCL_FAULT_AT_STEP"
GO, SAVE, STOP, REQUEUE = 0, 1, 2, 3  # what the ranks agree on after a step (the largest wins)


def fault_hook(ctx: DistContext) -> tuple[int, int] | None:
    """(step, signal) of ``ADVCL_FAULT_AT_STEP`` for this rank, or None."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    parts = text.split(":")
    try:
        step = int(parts[0])
        sig = getattr(signal, "SIG" + (parts[1] if len(parts) > 1 else "USR1").upper().removeprefix("SIG"))
        rank = int(parts[2]) if len(parts) > 2 else 0
    except (ValueError, AttributeError):
        raise TrainingError(f"{FAULT_ENV}={text!r} is not N[:SIGNAL[:RANK]]", f"unset {FAULT_ENV} (a test hook)") from None
    return (step, sig) if rank == ctx.rank else None


class Stops:
    """The stop requests of one run (a context manager that installs the signal handlers; the
    lifecycle sets ``armed`` while the epochs run)."""

    def __init__(self, ctx: DistContext, save_every_minutes: float | None = None):
        self.ctx = ctx
        self.every = save_every_minutes * 60 if save_every_minutes else None
        self.last_save = time.monotonic()
        self.received: int | None = None  # the signal that asked to stop
        self.armed = False
        self.fault = fault_hook(ctx)
        self._previous: dict = {}

    def __enter__(self) -> "Stops":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # outside the epochs SIGTERM stops at once; a second signal too (the last state is kept)
        if self.received is not None or (signum == signal.SIGTERM and not self.armed):
            raise KeyboardInterrupt
        self.received = signum

    def decide(self, step: int | None) -> int:
        """What every rank does after the run's ``step``-th step (1-based; None: after an epoch):
        GO, SAVE, STOP or REQUEUE, the same on every rank."""
        if self.fault is not None and step == self.fault[0]:
            os.kill(os.getpid(), self.fault[1])
        wish = GO
        if self.received is not None:
            wish = REQUEUE if self.received == signal.SIGUSR1 and os.environ.get("SLURM_JOB_ID") else STOP
        elif self.every is not None and self.ctx.is_main and time.monotonic() - self.last_save >= self.every:
            wish = SAVE
        return agree_max(wish, self.ctx)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def stop(self, decision: int, where: str):
        """After the state was saved: requeue (rank 0, once) and end every rank."""
        if decision == REQUEUE:
            job = os.environ["SLURM_JOB_ID"]
            on_main(lambda: requeue(job), self.ctx)
            raise Requeued(f"saved the run {where} and requeued Slurm job {job}, which continues it")
        raise KeyboardInterrupt


def requeue(job: str) -> None:
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TrainingError(f"scontrol requeue {job} failed: {e}", "requeue the job by hand; the state is saved") from None
    if done.returncode != 0:
        raise TrainingError(f"scontrol requeue {job} failed: {done.stderr.strip() or done.returncode}",
                            "requeue the job by hand; the state is saved")
