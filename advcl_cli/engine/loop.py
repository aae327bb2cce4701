"""The training-epoch loop that pretraining and finetuning share.

Per epoch: the batches' order and a random stream are functions of (seed, epoch) only, so a
resumed run draws what an uninterrupted one does; ``before_epoch(epoch)`` runs first. Per step:
the rate from the schedule (``lr(epoch, step, steps)``), ``step(images, labels, indices, gen)``
under autocast returns the loss and its parts, then backward, the gradient all-reduce, the
optimizer step and ``after_step()``. The steps of an epoch are counted after ``before_epoch``,
which may change the batches (RCS's coreset). The parts are summed on the device and read once per
logging interval, where the NaN/inf guard is checked too (no device sync per step). The
epoch's metrics (means of the parts, the last rate, images/s, seconds) go to ``end_epoch``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..optim import set_lr
from ..device import autocast
from ..distributed import DistContext, reduce_mean, sync_gradients
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

    def run(self, start: int, epochs: int, end_epoch: Callable[[int, dict], None]) -> None:
        """Epochs ``start`` .. ``epochs - 1`` (0-based); ``end_epoch(done, metrics)`` after each."""
        ctx, steps = self.ctx, len(self.batches)
        if ctx.is_main:
            self.reporter.start(self.name, total=(epochs - start) * steps)
        for epoch in range(start, epochs):
            self.batches.set_epoch(epoch)
            self.before_epoch(epoch)
            steps = len(self.batches)  # RCS's coreset changes it after the warm-up
            gen = epoch_generator(self.seed, epoch, self.device)
            guard, sums, images_seen = FiniteGuard(), {}, 0
            info: dict = {"epoch": f"{epoch + 1}/{epochs}"}
            t0 = time.perf_counter()
            for i, (images, labels, indices) in enumerate(self.batches):
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
            seconds = time.perf_counter() - t0
            guard.check_weights(self.model, epoch + 1, self.last_good())
            metrics = {"epoch": epoch + 1, "lr": lr}
            metrics.update({k: float(reduce_mean(v / steps, ctx)) for k, v in sums.items()})
            metrics.update({"images_per_s": images_seen / seconds, "seconds": seconds})
            end_epoch(epoch + 1, metrics)
        if ctx.is_main:
            self.reporter.finish()
