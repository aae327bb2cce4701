"""Optimisers and learning-rate schedules of the training engines.

Schedules are pure functions of the position (0-based epoch, 0-based step in the epoch, steps
per epoch): they hold no state, so resuming a run needs only the epoch it stopped at.
``set_lr`` writes a value into every parameter group of an optimizer.

- ``WarmupCosine``: the AdvCL pretraining schedule, matched to the authors' ``utils.py``
  (``adjust_learning_rate`` with ``--cosine`` and ``warmup_learning_rate``). Cosine per epoch:
  epoch ``e`` runs at ``min + (base - min) * (1 + cos(pi * (e + 1) / E)) / 2`` with
  ``min = base * min_ratio`` (the code sets it at the start of epoch ``e + 1`` in its 1-based
  count, so even the first epoch is below ``base`` and the last is at ``min``); linear warm-up
  per step during the first ``warmup_epochs`` epochs, from ``warmup_from`` to the cosine value
  at epoch ``warmup_epochs``.
- ``CosineAnnealing``: the ACL code's ``cosine_annealing`` through ``LambdaLR``, whose
  ``scheduler.step()`` runs before each update, so update ``t`` (1-based) runs at
  ``base * t / W`` during ``W`` warm-up units, then at
  ``min + (base - min) * (1 + cos(pi * (t - W) / (T - W))) / 2``; a unit is a step
  (``per="step"``, ACL) or an epoch (``per="epoch"``).
- ``EpochWarmupCosine``: DynACL's schedule (``train_DynACL.py``): the ``cosine_annealing`` of
  its ``utils.py`` (warm-up factor ``(step + 1) / W``) through ``LambdaLR``, whose
  ``scheduler.step()`` runs once after each epoch, so epoch ``e`` (0-based) runs at
  ``base * (e + 1) / W`` for ``e < W``, then at
  ``min + (base - min) * (1 + cos(pi * (e - W) / (E - W))) / 2`` (epoch ``W`` at ``base``, the
  last epoch above ``min``); constant within an epoch.
- ``LinearWarmupCosine``: solo-learn's ``warmup_cosine`` (pl_bolts'
  ``LinearWarmupCosineAnnealingLR``), which Lightning steps once per epoch, as DeACL's code runs
  it: epoch ``e < W`` at ``start + e * (base - start) / (W - 1)`` (the last warm-up epoch is at
  ``base``), then ``min + (base - min) * (1 + cos(pi * (e - W) / (E - W))) / 2`` (epoch ``W``
  at ``base`` again; the last epoch above ``min``).
- ``GradualWarmupCosine``: RoCL's schedule (``rocl_train.py``: ``GradualWarmupScheduler`` with
  ``multiplier`` 15 over 10 epochs, then ``CosineAnnealingLR(T_max=epochs)``, stepped at the
  start of every epoch): epoch ``e`` (0-based) runs at ``base * (1 + (m - 1) (e + 1) / W)`` for
  ``e + 1 <= W`` (up to ``m * base``), then at ``m * base * (1 + cos(pi * (e + 1 - W) / E)) / 2``
  (the closed form the scheduler intends; constant within an epoch).
- ``MultiStep``: the rate times ``gamma`` at every milestone epoch reached (finetuning).

``LARS`` is layer-wise adaptive rate scaling as the ACL code defines it (``optimizer/lars.py``):
for every parameter ``w`` with gradient ``g``, ``local = eta * |w| / (|g| + wd * |w|)`` (1 when
either norm is below 1e-15), ``buf = momentum * buf + lr * local * (g + wd * w)``,
``w -= buf``. Weight decay applies to every parameter (biases and BN weights too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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


def half_cosine(base_lr: float, min_lr: float, progress: float) -> float:
    """From ``base_lr`` at progress 0 down to ``min_lr`` at 1, along half a cosine."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineAnnealing:
    base_lr: float
    epochs: int
    warmup_epochs: int = 0
    min_lr: float = 0.0
    per: Literal["step", "epoch"] = "step"

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        units = steps_per_epoch if self.per == "step" else 1
        t = epoch * units + (step if self.per == "step" else 0) + 1
        warmup, total = self.warmup_epochs * units, self.epochs * units
        if t < warmup:
            return self.base_lr * t / warmup
        progress = (t - warmup) / max(total - warmup, 1)
        return half_cosine(self.base_lr, self.min_lr, progress)


@dataclass(frozen=True)
class EpochWarmupCosine:
    base_lr: float
    epochs: int
    warmup_epochs: int = 10
    min_lr: float = 0.0

    def warmup(self, epoch: int) -> float:
        return self.base_lr * (epoch + 1) / self.warmup_epochs

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup(epoch)
        progress = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1)
        return half_cosine(self.base_lr, self.min_lr, progress)


@dataclass(frozen=True)
class LinearWarmupCosine(EpochWarmupCosine):
    """EpochWarmupCosine with solo-learn's warm-up: from ``warmup_from`` at epoch 0 to ``base``
    at epoch ``W - 1``."""

    warmup_from: float = 0.003

    def warmup(self, epoch: int) -> float:
        return self.warmup_from + epoch * (self.base_lr - self.warmup_from) / max(self.warmup_epochs - 1, 1)


@dataclass(frozen=True)
class GradualWarmupCosine(EpochWarmupCosine):
    """EpochWarmupCosine with RoCL's warm-up to ``multiplier`` x base and its cosine over all
    ``epochs``; the scheduler steps before each epoch, so epoch ``e`` runs at position e + 1."""

    multiplier: float = 15.0

    def warmup(self, epoch: int) -> float:
        return self.base_lr * (1 + (self.multiplier - 1) * (epoch + 1) / self.warmup_epochs)

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup(epoch)
        return half_cosine(self.base_lr * self.multiplier, self.min_lr, (epoch + 1 - self.warmup_epochs) / self.epochs)


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


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling, as in the ACL code (see the module's docstring)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 1e-3):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta < 0:
            raise ValueError("LARS needs non-negative lr, momentum, weight_decay and eta")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, momentum, lr = group["weight_decay"], group["eta"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                local = eta * w_norm / (g_norm + wd * w_norm)
                local = torch.where((w_norm < 1e-15) | (g_norm < 1e-15), torch.ones_like(local), local)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_((g + wd * p) * (lr * local))
                p.sub_(buf)
        return loss


def build_optimizer(name: str, params, *, lr: float, momentum: float, weight_decay: float,
                    eta: float = 1e-3) -> torch.optim.Optimizer:
    """``sgd`` (torch's, with momentum and weight decay) or ``lars``."""
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
