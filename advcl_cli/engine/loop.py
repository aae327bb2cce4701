"""The training-epoch loop that pretraining and finetuning share.

Per epoch: the batches' order and a random stream are functions of (seed, epoch) only, so a
resumed run draws what an uninterrupted one does; ``before_epoch(epoch)`` runs first. Per step:
the rate from the schedule (``lr(epoch, step, steps)``), ``step(images, labels, indices, gen)``
under autocast returns the loss and its parts, then backward, the gradient all-reduce, the
optimizer step and ``after_step()``. The steps of an epoch are counted after ``before_epoch``,
which may change the batches (RCS's coreset). The parts are summed on the device and read once per
logging interval, where the NaN/inf guard is checked too (no device sync per step). The
epoch's metrics (means of the parts, the last rate, images/s, seconds) go to ``end_epoch``.

Between two steps (never after an epoch's last one) and after each epoch but the last,
``between(step, position)`` may save a mid-epoch state (``position()``: where the run stands, for
``RunDir.save_state``'s ``extra``) and stop the run (``engine.lifecycle``); a loop given such a
``position`` starts its first epoch at its step, with its random stream and its sums so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..optim import set_lr
from ..device import autocast
from ..distributed import DistContext, all_gather_rows, reduce_mean, sync_gradients
from ..report import Reporter
from .run import FiniteGuard, epoch_generator

LOG_EVERY = 10  # steps between progress updates / NaN checks


@dataclass
class Loop:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: object  # data.batches.Batches
    schedule: object  # optim.WarmupCosine, CosineAnnealing, MultiStep, ...
    step: Callable  # (images, labels, indices, gen) -> (loss, {name: detached tensor})
    name: str
    seed: int
    device: torch.device
    precision: str = "fp32"
    ctx: DistContext = field(default_factory=DistContext)
    reporter: Reporter = field(default_factory=Reporter)
    before_epoch: Callable[[int], None] = lambda epoch: None
    after_step: Callable[[], None] = lambda: None
    last_good: Callable[[], str] = lambda: "no model was saved yet"  # for the NaN message
    between: Callable[[int | None, Callable[[], dict] | None], None] = lambda step, position: None
    position: dict | None = None  # a mid-epoch state's ``extra["position"]``: where the first epoch starts

    def run(self, start: int, epochs: int, end_epoch: Callable[[int, dict], None]) -> None:
        """Epochs ``start`` .. ``epochs - 1`` (0-based); ``end_epoch(done, metrics)`` after each."""
        ctx, steps = self.ctx, len(self.batches)
        at = self.position if self.position is not None and self.position["epoch"] == start else None
        if ctx.is_main:
            self.reporter.start(self.name, total=(epochs - start) * steps - (at["step"] if at else 0))
        for epoch in range(start, epochs):
            self.batches.set_epoch(epoch)
            self.before_epoch(epoch)
            steps = len(self.batches)  # RCS's coreset changes it after the warm-up
            gen = epoch_generator(self.seed, epoch, self.device)
            guard, sums, images_seen, first, seconds = FiniteGuard(), {}, 0, 0, 0.0
            if at is not None and epoch == start:
                first, sums, images_seen, seconds = self._resume_at(at, gen)
            info: dict = {"epoch": f"{epoch + 1}/{epochs}"}
            t0 = time.perf_counter() - seconds
            for i, (images, labels, indices) in enumerate(self.batches.from_step(first), first):
                lr = self.schedule.lr(epoch, i, steps)
                set_lr(self.optimizer, lr)
                with autocast(self.precision, self.device):
                    loss, terms = self.step(images, labels, indices, gen)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sync_gradients(self.model, ctx)
                self.optimizer.step()
                self.after_step()
                guard.update(loss, i)
                images_seen += images.shape[0]
                for name, value in {"loss": loss.detach(), **terms}.items():
                    sums[name] = sums.get(name, 0) + value.float()
                if (i + 1) % LOG_EVERY == 0 or i + 1 == steps:
                    guard.check(epoch + 1, self.last_good(), ctx)
                    info["loss"] = float(sums["loss"]) / (i + 1)
                    info["img_s"] = images_seen / (time.perf_counter() - t0)
                if ctx.is_main:
                    self.reporter.advance(1, **info)
                if i + 1 < steps:
                    self.between(epoch * steps + i + 1, lambda: self._position(
                        epoch, i + 1, gen, guard, sums, images_seen, time.perf_counter() - t0))
            seconds = time.perf_counter() - t0
            guard.check_weights(self.model, epoch + 1, self.last_good())
            metrics = {"epoch": epoch + 1, "lr": lr}
            metrics.update({k: float(reduce_mean(v / steps, ctx)) for k, v in sums.items()})
            metrics.update({"images_per_s": images_seen / seconds, "seconds": seconds})
            end_epoch(epoch + 1, metrics)
            if epoch + 1 < epochs:
                self.between(None, None)
        if ctx.is_main:
            self.reporter.finish()

    def _position(self, epoch: int, step: int, gen, guard: FiniteGuard, sums: dict, images_seen: int,
                  seconds: float) -> dict:
        """Where the run stands after ``step`` steps of ``epoch`` (0-based), once the NaN guard
        passed (no bad weights are saved): every rank's sums of the loss terms, one row each."""
        guard.check(epoch + 1, self.last_good(), self.ctx)
        names = list(sums)
        rows = all_gather_rows(torch.stack([sums[k] for k in names]) if names else torch.zeros(0), self.ctx)
        return {"epoch": epoch, "step": step, "gen": gen.get_state().cpu(), "sum_names": names, "sums": rows.cpu(),
                "images_seen": images_seen, "seconds": seconds}

    def _resume_at(self, at: dict, gen) -> tuple[int, dict, int, float]:
        """(first step, sums, images seen, seconds) of a resumed epoch; ``gen`` set where it was."""
        gen.set_state(at["gen"])
        row = at["sums"][min(self.ctx.rank, len(at["sums"]) - 1)] if len(at["sum_names"]) else None
        sums = {k: row[j].to(self.device) for j, k in enumerate(at["sum_names"])}
        return int(at["step"]), sums, int(at["images_seen"]), float(at["seconds"])
