"""Attacks by name: ``fgsm``, ``pgdN`` (``pgd20``), ``cwN`` (``cw20``), AutoAttack's versions
(``autoattack``, ``autoattack-plus``, ``autoattack-rand``) and its components alone (``apgd-ce``,
``apgd-t``, ``fab-t``, ``square``), each under the L-inf or the L2 norm.

``get_attack(name, norm)`` parses a name into an ``Attack``; calling it as
``attack(model, x, y, eps, gen=...)`` returns adversarial images in the eps-ball and in [0, 1].
The iterative attacks step ``eps/4`` per iteration, which is the standard 2/255 at eps 8/255.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .autoattack import VERSIONS
from .pgd import NORMS, cw, fgsm, pgd, trades_adversary, trades_loss

NAMES = ("fgsm", "pgdN (e.g. pgd20)", "cwN (e.g. cw20)", *VERSIONS)
MAX_STEPS = 10_000
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}


def check_norm(norm: str) -> str:
    key = str(norm).strip().lower().replace("-", "")
    if key not in NORMS:
        raise UsageError(f"unknown norm '{norm}'", "choose linf or l2")
    return key


@dataclass(frozen=True)
class Attack:
    name: str  # canonical: fgsm, pgd20, cw20, autoattack, autoattack-plus, apgd-ce, ...
    kind: str  # fgsm | pgd | cw | autoattack (every AutoAttack version and component)
    steps: int = 1
    norm: str = "linf"  # linf | l2

    @property
    def description(self) -> str:
        norm = NORM_NAMES[self.norm]
        direction = "signed-gradient" if self.norm == "linf" else "L2-normalised-gradient"
        if self.kind == "fgsm":
            return f"FGSM ({norm}): one {direction} step of eps on the cross-entropy"
        if self.kind == "pgd":
            return f"PGD ({norm}): {self.steps} {direction} steps of eps/4 on the cross-entropy, uniform random start"
        if self.kind == "cw":
            return (f"CW ({norm}): {self.steps} PGD {direction} steps of eps/4 on the CW margin loss (kappa 50), "
                    "uniform random start")
        from .autoattack import describe

        return describe(self.name, self.norm)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
                 gen: torch.Generator | None = None, seed: int = 0, log=None, progress=None) -> Tensor:
        """Adversarial versions of ``x``; ``gen`` seeds the random starts, ``seed`` AutoAttack,
        ``log`` (a callable) receives AutoAttack's warnings and ``progress`` its progress lines."""
        if self.kind == "fgsm":
            return fgsm(model, x, y, eps, norm=self.norm)
        if self.kind == "pgd":
            return pgd(model, x, y, eps, self.steps, gen=gen, norm=self.norm)
        if self.kind == "cw":
            return cw(model, x, y, eps, self.steps, gen=gen, norm=self.norm)
        from .autoattack import autoattack

        return autoattack(model, x, y, eps, seed=seed, log=log, progress=progress, version=self.name, norm=self.norm)


def get_attack(name: str, norm: str = "linf") -> Attack:
    """Parse an attack name (and a norm, linf or l2); an unknown one is a UsageError that lists
    the names."""
    norm = check_norm(norm)
    key = str(name).strip().lower().replace("-", "")
    if key == "fgsm":
        return Attack("fgsm", "fgsm", 1, norm)
    if key == "aa":
        key = "autoattack"
    version = next((v for v in VERSIONS if v.replace("-", "") == key), None)
    if version is not None:
        return Attack(version, "autoattack", 0, norm)
    m = re.fullmatch(r"(pgd|cw)(\d+)", key)
    if m and 1 <= int(m.group(2)) <= MAX_STEPS:
        kind, steps = m.group(1), int(m.group(2))
        return Attack(f"{kind}{steps}", kind, steps, norm)
    raise UsageError(f"unknown attack '{name}'", f"choose from: {', '.join(NAMES)}")


__all__ = ["Attack", "NAMES", "NORMS", "check_norm", "get_attack", "fgsm", "pgd", "cw",
           "trades_adversary", "trades_loss"]
