"""The run folder shared by the training engines: its lifecycle, metrics log, resume state, guards.

A run folder holds the model file(s) the engine names (``encoder.safetensors``,
``classifier.safetensors``), ``state.safetensors`` (the resume state: weights, optimizer,
epochs done, RNG states, the run's configuration, the verb that trains it) and
``metrics.jsonl`` (one JSON object per finished epoch), and ``.lock``. Nothing here knows which
method trains the model. Every training engine (pretrain, finetune, lpaft) goes through
``engine.lifecycle.Lifecycle`` (which calls ``open_run`` and ``begin_run``), decorated with
``holds_run_folder``.

Rules:

- a run folder belongs to one run: ``open`` takes an exclusive ``flock`` on ``.lock`` (which
  holds the pid and host) before it checks anything and keeps it until the engine returns
  (``holds_run_folder``); another start, resume or ``--force`` is refused while it is held
  (exit 2, naming the pid). The kernel drops the lock of a process that is gone, so a crashed run
  leaves no stale lock. Under torchrun rank 0 holds it while the others wait;
- the folder is checked first (``check``, which writes nothing but the lock) and created or
  cleared only when every other check has passed and training is about to start (``begin``),
  so a refused run leaves no folder behind (a folder ``open`` made is removed again);
- a folder is advcl's when it holds a resume state (which names its verb), or when ``.lock``
  says that a run of this verb began there: a fresh run refuses a folder that holds a run
  (finished or not) unless ``force``, and never replaces another verb's run, even with
  ``force``; a metrics log or model file advcl did not write is replaced only with ``force``;
  nothing that is not a regular file is ever replaced;
- temporaries of the run's own files that a killed process left (``.state.safetensors.*.tmp``)
  are removed at every start, resume and ``--force``;
- ``resume`` needs a state file; the metrics log is cut back to the epochs the state holds,
  so a run killed after logging an epoch but before saving its state logs that epoch once;
  a line of the log that is not an epoch record is named (only the last line may be torn);
- the state is written atomically after every epoch; pretraining writes it before the
  encoder, so a crash loses at most the epoch in progress and the printed hint always works;
- the loss is checked for NaN/inf without a device sync per step: ``FiniteGuard.update`` keeps
  the first bad step in a device tensor and ``check`` (called at logging intervals and at the
  end of every epoch, before anything is saved) raises ``TrainingError`` naming the epoch and
  step. Weights after a bad step are never saved, so the last files on disk are good.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import (atomic_write, check_folder_writable, check_regular, clean_state_dict, load_state, parse_json, save_state, unwrap,
                          write_all)
from ..data.registry import load_dataset, num_classes_of
from ..distributed import barrier, on_main
from ..errors import CheckpointError, TrainingError, UsageError, os_error

STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


@dataclass
class RunResult:
    """What a training engine returns: the final model file and the run's last metrics."""

    path: Path
    run_dir: Path
    epochs: int
    metrics: dict
    is_main: bool = True  # False on the other ranks of a torchrun job (they print nothing)
    runtime: dict = field(default_factory=dict)  # what ran: device.Runtime.record()


_HELD: list["RunDir"] = []  # the run folders whose lock this process holds, newest last


def holds_run_folder(engine: Callable) -> Callable:
    """A training engine's decorator: every run folder it locked (``RunDir.open``) is released
    when it returns or fails, however it ends."""

    @functools.wraps(engine)
    def run(*args, **kwargs):
        mark = len(_HELD)
        try:
            return engine(*args, **kwargs)
        finally:
            while len(_HELD) > mark:
                _HELD.pop().release()

    return run


class RunDir:
    """One run folder of ``verb``; ``artifacts`` are the model files the engine writes there."""

    def __init__(self, path: str | Path, artifacts: tuple[str, ...] = ("encoder.safetensors",), verb: str | None = None):
        self.path = Path(path)
        self.artifacts = artifacts
        self.verb = verb
        self._lock: int | None = None  # the descriptor holding the flock
        self._made: list[Path] = []  # what open created: removed again if the run never begins
        self._began = False
        self._lock_verb: str | None = None  # the verb of the last run that began here (.lock)
        self.trackers = None  # tracking.Trackers on rank 0 with --log: every epoch record goes there too

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def artifact(self, name: str) -> Path:
        return self.path / name

    @property
    def own_files(self) -> tuple[Path, ...]:
        """The files a run writes (and a fresh start with --force deletes)."""
        return (self.state_path, self.metrics_path, *map(self.artifact, self.artifacts))

    def read_state(self) -> dict:
        try:
            state = load_state(self.state_path)
        except CheckpointError as e:
            e.hint = e.hint or "start over with --force"
            raise
        except KeyError as e:  # a tensor the JSON names is not in the file
            raise self.damaged(f"tensor {e} is missing") from None
        except Exception as e:  # a damaged file: safetensors/json raise their own types
            raise CheckpointError(f"resume state {self.state_path} is unreadable: {e}", "start over with --force") from None
        missing = [k for k in ("epoch", "total_epochs", "config", "model", "optimizer", "rng") if k not in state]
        if missing:
            raise self.damaged(f"it lacks {', '.join(missing)}")
        epoch, total = state["epoch"], state["total_epochs"]
        if not (isinstance(epoch, int) and isinstance(total, int) and 0 <= epoch <= total and total >= 1):
            raise self.damaged(f"epoch {epoch!r} of {total!r} is not a finished epoch count")
        if not all(isinstance(state[k], dict) for k in ("config", "model", "optimizer", "rng")):
            raise self.damaged("its config, model, optimizer or rng entry is not a table")
        return state

    @property
    def what(self) -> str:
        return f"advcl {self.verb} run" if self.verb else "advcl run"

    def damaged(self, what: str) -> CheckpointError:
        return CheckpointError(f"resume state {self.state_path} is damaged: {what}", "start over with --force")

    def stored_config(self) -> dict | None:
        """The configuration of the run in this folder, or None without a state file."""
        return self.read_state().get("config") if self.state_path.is_file() else None

    # --- the lifecycle --------------------------------------------------------------------
    def open(self, *, resume: bool | str, force: bool) -> dict | None:
        """Lock the folder for this run, check it (``check``) and remove the temporaries a
        killed run left; return the resume state (None: fresh). ``resume`` "auto" resumes when
        the folder holds a resume state, else starts. A refusal releases the lock."""
        if resume and force:
            raise UsageError("--resume and --force contradict each other", "--resume continues a run, --force starts over")
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file, not a run folder", "choose a folder path for --out")
        check_folder_writable(self.path, f"--out {self.path}")
        try:
            self.acquire()
            state = self.check(resume=self.resumes(resume), force=force)
            self.remove_temporaries()
        except BaseException:
            self.release()
            raise
        return state

    def resumes(self, resume: bool | str) -> bool:
        """Whether a run with ``resume`` (True, False, "auto") continues the run in the folder."""
        return self.state_path.is_file() if resume == "auto" else bool(resume)

    def acquire(self) -> None:
        """Hold ``.lock`` (created with the folder if need be), or a UsageError naming the
        process that holds it."""
        try:
            self._made = [p for p in (self.lock_path, self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = self._read_lock(fd)
                    os.close(fd)
                    if not isinstance(e, BlockingIOError):  # a file system without locks
                        raise
                    raise UsageError(f"{self.path} is in use by another run (pid {holder.get('pid', '?')} on "
                                     f"{holder.get('host', '?')})",
                                     "wait until it ends, or choose another --out") from None
                try:  # the file locked is still the one at the path (not one a refused start removed)
                    same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self._lock = fd
            _HELD.append(self)
            self._lock_verb = self._read_lock(fd).get("verb")
            self._write_lock(self._lock_verb)
        except OSError as e:
            raise os_error(e, e.filename or self.lock_path) from None

    @staticmethod
    def _read_lock(fd: int) -> dict:
        try:
            record = parse_json(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _write_lock(self, verb: str | None) -> None:
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "verb": verb}).encode()
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, data, 0)

    def release(self) -> None:
        """Let the lock go; the lock file and folder ``open`` made for a run that never began
        are removed again."""
        if self.trackers is not None:
            self.trackers.close()
        if self._lock is None:
            return
        fd, self._lock = self._lock, None
        if self in _HELD:
            _HELD.remove(self)
        try:
            if not self._began:  # the lock file first, then the folders, deepest first
                for made in self._made:
                    with contextlib.suppress(OSError):
                        made.unlink() if made == self.lock_path else made.rmdir()
        finally:
            os.close(fd)

    def check(self, *, resume: bool, force: bool) -> dict | None:
        """Check the folder for a fresh or resumed run, changing nothing; return the resume
        state (None: fresh). See the rules at the top."""
        for own in self.own_files:  # a device, pipe or link is never replaced, not even with --force
            check_regular(own)
        state = None
        if self.state_path.is_file():
            try:
                state = self.read_state()
            except CheckpointError:  # a damaged state: --force (its hint) starts over
                if resume or not force:
                    raise
        if state is not None and self.verb is not None and (state.get("verb") or self.verb) != self.verb:
            raise UsageError(f"{self.path} holds an advcl {state['verb']} run, not a {self.verb} run",
                             f"choose another --out: advcl {self.verb} never replaces another verb's run, not even with --force")
        if resume:
            if state is None:
                raise UsageError(
                    f"nothing to resume in {self.path}: no {STATE_FILE}",
                    "start the run without --resume (pass the same --out)",
                )
            self.read_metrics()  # a damaged log is named now, before anything is done
            return state
        if state is not None and not force:
            if state.get("finished"):
                raise UsageError(
                    f"{self.path} already holds a finished run ({state['epoch']} epochs)",
                    "pass --force to overwrite it, or choose another --out",
                )
            raise UsageError(
                f"{self.path} holds an unfinished run ({state['epoch']} of {state['total_epochs']} epochs)",
                "pass --resume to continue it, --force to start over, or choose another --out",
            )
        began_here = self._lock_verb is not None and self._lock_verb == self.verb
        others = [p for p in self.own_files if p.exists()]
        if state is None and others and not force and not began_here:
            raise UsageError(f"{self.path} already holds {others[0].name}, which no {self.what} wrote",
                             "pass --force to overwrite it, or choose another --out")
        return None

    def remove_temporaries(self) -> None:
        """The temporary files of this run's own names that a killed writer left behind."""
        for own in self.own_files:
            for tmp in self.path.glob(f".{glob.escape(own.name)}.*.tmp"):
                tmp.unlink(missing_ok=True)
        for probe in self.path.glob(".advcl-probe-*"):
            probe.unlink(missing_ok=True)

    def holds(self, path: str | Path) -> bool:
        """Whether ``path`` is one of the files this run folder writes (or deletes)."""
        target = Path(path).resolve()
        return any(target == p.resolve() for p in self.own_files)

    def begin(self, state: dict | None) -> None:
        """Start writing, once every check has passed: a fresh run deletes the old run's files
        (``check`` allowed it) and creates the folder; a resumed one cuts the metrics log back
        to the epochs its state holds. ``.lock`` records that a run of this verb began here."""
        try:
            self._began = True
            if self._lock is not None:
                self._write_lock(self.verb)
            if state is not None:
                self._truncate_metrics(int(state["epoch"]))
                return
            for p in self.own_files:
                if p.exists():
                    p.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, e.filename or self.path) from None

    # --- metrics ------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise os_error(e, self.metrics_path) from None
        if self.trackers is not None:
            self.trackers.log(record)

    def read_metrics(self) -> list[dict]:
        """The logged epochs; a last line torn by a crash mid-write is skipped. Any other line
        that is not an epoch record (an object with an integer ``epoch``) is a CheckpointError
        naming it."""
        if not self.metrics_path.is_file():
            return []
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {self.metrics_path}: {e}", "start over with --force") from None
        records = []
        for n, line in enumerate(lines, 1):
            try:
                record = parse_json(line)
            except ValueError:  # also a line nested too deeply
                if n == len(lines):  # torn by a crash
                    continue
                record = None
            if not (isinstance(record, dict) and type(record.get("epoch")) is int):
                raise CheckpointError(f"{self.metrics_path} line {n} is not an epoch record: {line[:60]!r}",
                                      "delete that line (the log has one JSON object per epoch), or start over with --force")
            records.append(record)
        return records

    def _truncate_metrics(self, epochs_done: int) -> None:
        if not self.metrics_path.is_file():
            return
        keep = [r for r in self.read_metrics() if r["epoch"] <= epochs_done]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        if text != self.metrics_path.read_text():
            atomic_write(self.metrics_path, text.encode())

    # --- resume state ---------------------------------------------------------------------
    def save_state(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        epoch: int,
        total_epochs: int,
        config: dict,
        extra: dict | None = None,
        finished: bool | None = None,
    ) -> Path:
        """Everything needed to continue after ``epoch`` finished epochs (atomic write);
        ``finished`` defaults to whether every epoch is done."""
        state = {
            "verb": self.verb,
            "epoch": epoch,
            "total_epochs": total_epochs,
            "finished": epoch >= total_epochs if finished is None else finished,
            "config": config,
            "model": clean_state_dict(unwrap(model).state_dict()),
            "optimizer": optimizer.state_dict(),
            "rng": capture_rng(),
            "extra": extra or {},
            "tracking": self.trackers.state() if self.trackers is not None else {},
        }
        return save_state(self.state_path, state)


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load weights, optimizer and RNG states from ``state``; return the epochs done."""
    try:
        unwrap(model).load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the resume state does not fit this model: {str(e).splitlines()[0]}", "start over with --force") from None
    restore_rng(state.get("rng", {}))
    return int(state["epoch"])


def capture_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].to(torch.uint8))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in rng["cuda"]])


def check_resume_config(stored: dict, current: dict, ignore: set[str], where: Callable[[str], str] = lambda k: "now") -> None:
    """A resumed run must train the same thing: compare the settings that shape the result
    (``where``: where a setting's current value comes from, for the message)."""
    if stored.get("method", current.get("method")) != current.get("method"):
        raise UsageError(f"cannot resume with --method {current['method']}: the run trains {stored['method']}",
                         f"resume with --method {stored['method']}, or start over with --force")
    unknown = sorted(set(stored) - set(current) - ignore)
    if unknown:
        raise UsageError(f"cannot resume: the run was started with settings this advcl does not have ({', '.join(unknown)})",
                         "resume with the advcl version that started it, or start over with --force")
    differ = sorted(k for k in set(stored) | set(current) if k not in ignore and stored.get(k) != current.get(k))
    if differ:
        parts = [f"{k.replace('_', '-')} is {current.get(k)!r} {where(k)} but {stored.get(k)!r} in the run" for k in differ[:3]]
        raise UsageError("cannot resume with different settings: " + "; ".join(parts),
                         "resume without them (the run's own settings are kept), or start over with --force")


def check_derived(run: "RunDir", parent, dataset: str, does: str) -> None:
    """The checks of a run made from a checkpoint (finetuning, post-processing), before anything
    else: the run folder must not write the ``parent`` checkpoint; ``dataset`` must be known.
    ``does`` says what the run does with ``parent`` ("finetunes")."""
    if run.holds(parent.path):
        raise UsageError(f"the run folder {run.path} would write {parent.path}, the checkpoint it {does}",
                         "choose another --out")
    num_classes_of(dataset)  # an unknown dataset, before anything else


def check_parent(state: dict, sha256: str, run: "RunDir", does: str) -> None:
    """A resumed run that started from a checkpoint (finetuning, post-processing) continues from
    that checkpoint only; ``does`` says what the run does with it ("finetunes")."""
    stored = state["extra"].get("parent")
    if stored != sha256:
        raise UsageError(f"{run.path} {does} another checkpoint (sha256 {str(stored)[:12]}...)",
                         "resume with the checkpoint it started from, or start over with --force")


def open_run(run: "RunDir", ctx, *, batch_size: int, resume: bool | str, force: bool) -> dict | None:
    """The start every training engine shares: the global batch must divide among the ranks;
    rank 0 locks and checks the folder (``RunDir.open``: nothing else is written yet) while the others wait,
    then the others read the resume state. Returns that state (None for a fresh run). Rank 0
    holds the folder's lock from here until the engine returns (``holds_run_folder``)."""

    if batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {batch_size} does not divide among {ctx.world_size} processes",
                         "the batch size is the global batch: use a multiple of the process count")
    state = on_main(lambda: run.open(resume=resume, force=force), ctx)
    if not ctx.is_main and run.resumes(resume):  # rank 0 holds the lock: what it saw is there
        state = run.read_state()
    return state


def begin_run(run: "RunDir", ctx, state: dict | None, settings) -> None:
    """After every check and before the first epoch: rank 0 creates (or with --force clears) the
    run folder, or cuts a resumed run's metrics back (``RunDir.begin``), then opens the trackers
    of ``--log`` (``tracking.Trackers``; a resumed run continues its W&B run); a failure stops
    every rank. A check that fails before this leaves no folder behind."""

    def begin() -> None:
        run.begin(state)
        if settings.log:
            from ..tracking import Trackers

            run.trackers = Trackers(settings.log, run.path, settings.to_config(), state=(state or {}).get("tracking"),
                                    start=int(state["epoch"]) if state else 0)

    on_main(begin, ctx)


def load_split(name: str, split: str, ctx, *, download: bool, **kwargs):
    """Load a dataset split on every rank, downloading it once per node: local rank 0 first
    (with ``download``), then the others from its files."""

    data = load_dataset(name, split, download=download, **kwargs) if ctx.local_rank == 0 else None
    barrier(ctx)
    return data if data is not None else load_dataset(name, split, download=False, **kwargs)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The random stream of one epoch: a function of (seed, epoch) only, so a resumed run draws
    what an uninterrupted one does, and every rank of a distributed run draws the same numbers
    (each then keeps its slice of the global batch)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


class FiniteGuard:
    """Remembers the first step whose loss was NaN/inf, without syncing the device per step."""

    def __init__(self):
        self.first_bad: torch.Tensor | None = None

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, epoch: int, last_good: str, ctx=None) -> None:
        """Raise TrainingError if a bad loss was seen on any rank; ``epoch`` and the step are
        1-based. With several processes the ranks agree first, so all of them stop together."""
        if self.first_bad is None:
            return
        bad = self.first_bad
        if ctx is not None and ctx.enabled:
            import torch.distributed as dist

            bad = bad.clone()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        step = int(bad.item())
        if step >= 0:
            raise TrainingError(f"the loss became NaN or inf at epoch {epoch}, step {step + 1}; {last_good}",
                                self.hint(epoch))

    @staticmethod
    def hint(epoch: int) -> str:
        return ("lower --lr, or check the data; --resume restarts from the last saved epoch" if epoch > 1
                else "lower --lr, or check the data, and start again")

    def check_weights(self, model: torch.nn.Module, epoch: int, last_good: str) -> None:
        """Raise TrainingError if a weight or a running statistic is NaN or inf after ``epoch``
        (a loss can stay finite while the update diverges): such a model is never saved. Every
        rank holds the same weights, so every rank stops."""
        values = [t for t in model.state_dict().values() if t.is_floating_point()]
        if values and not bool(torch.stack([torch.isfinite(t).all() for t in values]).all()):
            raise TrainingError(f"the weights became NaN or inf in epoch {epoch}; {last_good}", self.hint(epoch))
