"""Experiment tracking: a run's epoch records and settings sent to TensorBoard or Weights & Biases.

``--log tensorboard,wandb`` names the trackers. ``check_available`` (called when the settings
are validated, so before anything runs) refuses a tracker whose package is not installed,
naming the extra to install. ``Trackers`` is what the run folder (``engine.run.RunDir``) holds
on rank 0: opened when training begins, given every record that goes to ``metrics.jsonl``
(``log``: each number in it, at the epoch as the step), asked what the resume state keeps
(``state``: the W&B run id, so a resumed run continues the same W&B run) and closed when the
run ends however it ends. The resolved settings are the hyper-parameters.

- tensorboard: event files in ``RUN/tensorboard`` through ``torch.utils.tensorboard``; a resumed
  or restarted run purges the steps from its first epoch on (``purge_step``), so TensorBoard
  shows each epoch once;
- wandb: ``wandb.init(dir=RUN, id=..., resume="allow")``, project ``$WANDB_PROJECT`` or
  ``advcl``; ``WANDB_MODE=offline`` keeps the run in ``RUN/wandb/offline-run-*`` without a
  network (``wandb sync`` uploads it later). W&B's console capture is off: advcl's stdout stays
  the command's result. A run W&B cannot start (not logged in, no network) is a UsageError
  before the first epoch.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import UsageError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs (and its extra)
TENSORBOARD_DIR = "tensorboard"


def check_available(names: list[str]) -> list[str]:
    """``names`` if each is a known tracker whose package is installed, else a ValueError that
    says which extra to install."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker '{name}' (choose from {', '.join(TRACKERS)})")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"the {name} tracker needs the {TRACKERS[name]} package: pip install 'advcl[{name}]'")
    return names


def scalars(record: dict) -> dict[str, float]:
    """The numbers of an epoch record, without the epoch itself."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def hyperparameters(config: dict) -> dict:
    """The settings as flat values a tracker takes (lists and tables as JSON text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}


class Trackers:
    """The trackers ``names`` of the run in ``folder``; ``state`` is what the resume state kept
    (``state()``), None for a fresh run; ``start`` is the number of epochs already done."""

    def __init__(self, names: list[str], folder: Path, config: dict, *, state: dict | None = None, start: int = 0):
        self.tb = self.wandb = None
        state = state or {}
        try:
            if "tensorboard" in names:
                self.tb = _tensorboard(Path(folder) / TENSORBOARD_DIR, config, start)
            if "wandb" in names:
                self.wandb = _wandb(Path(folder), config, state.get("wandb_id"))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        values, step = scalars(record), int(record["epoch"])
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def state(self) -> dict:
        return {"wandb_id": self.wandb.id} if self.wandb is not None else {}

    def close(self) -> None:
        tb, run, self.tb, self.wandb = self.tb, self.wandb, None, None
        if tb is not None:
            tb.close()
        if run is not None:
            run.finish()


def _tensorboard(folder: Path, config: dict, start: int):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(log_dir=str(folder), purge_step=start + 1)
    for summary in hparams(hyperparameters(config), {}):
        writer.file_writer.add_summary(summary)
    return writer


def _wandb(folder: Path, config: dict, run_id: str | None):
    import wandb

    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "advcl"), dir=str(folder), name=folder.name,
                          id=run_id, resume="allow", config=hyperparameters(config),
                          settings=wandb.Settings(console="off", quiet=True))
    except Exception as e:  # not logged in, no network, a bad WANDB_* variable: wandb's own error types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--log wandb: W&B could not start the run: {reason}",
                         "log in with `wandb login`, or set WANDB_MODE=offline to log without a network") from None
