"""Attacks by name: ``fgsm``, ``pgdN`` (``pgd20``), ``cwN`` (``cw20``) and ``autoattack``.

``get_attack(name)`` parses a name into an ``Attack``; calling it as
``attack(model, x, y, eps, gen=...)`` returns adversarial images in the eps-ball and in [0, 1].
The iterative attacks step ``eps/4`` per iteration, which is the standard 2/255 at eps 8/255.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .pgd import cw, fgsm, pgd, trades_adversary, trades_loss

NAMES = ("fgsm", "pgdN (e.g. pgd20)", "cwN (e.g. cw20)", "autoattack")
MAX_STEPS = 10_000


@dataclass(frozen=True)
class Attack:
    name: str  # canonical: fgsm, pgd20, cw20, autoattack
    kind: str  # fgsm | pgd | cw | autoattack
    steps: int = 1

    @property
    def description(self) -> str:
        if self.kind == "fgsm":
            return "FGSM: one signed-gradient step of eps on the cross-entropy"
        if self.kind == "pgd":
            return f"PGD: {self.steps} steps of eps/4 on the cross-entropy, uniform random start"
        if self.kind == "cw":
            return f"CW-inf: {self.steps} PGD steps of eps/4 on the CW margin loss (kappa 50), uniform random start"
        from .autoattack import describe

        return describe()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
                 gen: torch.Generator | None = None, seed: int = 0, log=None, progress=None) -> Tensor:
        """Adversarial versions of ``x``; ``gen`` seeds the random starts, ``seed`` AutoAttack,
        ``log`` (a callable) receives AutoAttack's warnings and ``progress`` its progress lines."""
        if self.kind == "fgsm":
            return fgsm(model, x, y, eps)
        if self.kind == "pgd":
            return pgd(model, x, y, eps, self.steps, gen=gen)
        if self.kind == "cw":
            return cw(model, x, y, eps, self.steps, gen=gen)
        from .autoattack import autoattack

        return autoattack(model, x, y, eps, seed=seed, log=log, progress=progress)


def get_attack(name: str) -> Attack:
    """Parse an attack name; an unknown one is a UsageError that lists the names."""
    key = str(name).strip().lower().replace("-", "")
    if key == "fgsm":
        return Attack("fgsm", "fgsm", 1)
    if key in ("autoattack", "aa"):
        return Attack("autoattack", "autoattack", 0)
    m = re.fullmatch(r"(pgd|cw)(\d+)", key)
    if m and 1 <= int(m.group(2)) <= MAX_STEPS:
        kind, steps = m.group(1), int(m.group(2))
        return Attack(f"{kind}{steps}", kind, steps)
    raise UsageError(f"unknown attack '{name}'", f"choose from: {', '.join(NAMES)}")


__all__ = ["Attack", "NAMES", "get_attack", "fgsm", "pgd", "cw", "trades_adversary", "trades_loss"]
