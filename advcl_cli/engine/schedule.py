"""Learning-rate schedules as pure functions of the position (epoch, step in epoch).

A schedule holds no state, so resuming a run needs only the epoch it stopped at. Epochs and
steps are 0-based. ``set_lr`` writes a value into every parameter group of an optimizer.

``WarmupCosine`` is the AdvCL pretraining schedule, matched to the authors' ``utils.py``
(``adjust_learning_rate`` with ``--cosine`` and ``warmup_learning_rate``):

- cosine per epoch: epoch ``e`` runs at ``min + (base - min) * (1 + cos(pi * (e + 1) / E)) / 2``
  with ``min = base * min_ratio`` (the code sets it at the start of epoch ``e + 1`` in its
  1-based count, so even the first epoch is below ``base`` and the last is at ``min``);
- linear warm-up per step during the first ``warmup_epochs`` epochs, from ``warmup_from`` to the
  cosine value at epoch ``warmup_epochs``:
  ``from + (step + e * steps_per_epoch) / (warmup_epochs * steps_per_epoch) * (to - from)``.

``MultiStep`` multiplies the rate by ``gamma`` at every milestone epoch reached
(epoch ``e`` runs at ``base * gamma ** #{m in milestones : e >= m}``), as the AdvCL finetuning
scripts do with their ``adjust_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    base_lr: float
    epochs: int
    warmup_epochs: int = 0
    warmup_from: float = 0.01
    min_ratio: float = 1e-3

    def cosine(self, epoch: int) -> float:
        low = self.base_lr * self.min_ratio
        return low + (self.base_lr - low) * (1 + math.cos(math.pi * (epoch + 1) / self.epochs)) / 2

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        if epoch < self.warmup_epochs:
            target = self.cosine(self.warmup_epochs - 1)
            p = (step + epoch * steps_per_epoch) / (self.warmup_epochs * steps_per_epoch)
            return self.warmup_from + p * (target - self.warmup_from)
        return self.cosine(epoch)


@dataclass(frozen=True)
class MultiStep:
    base_lr: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
