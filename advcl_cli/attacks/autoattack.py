"""The standard AutoAttack (Croce & Hein, ICML 2020) through the maintained ``pyautoattack``.

``pyautoattack`` (0.2.x on PyPI, MIT) repackages the authors' fra31/auto-attack code. We build
its ``AutoAttack(version='standard')`` and then set every component to the standard version's
settings explicitly, so a change of the package's defaults cannot silently weaken the attack:

- APGD-CE: 100 iterations, 1 restart, step-size decay rho 0.75, EOT 1, random start, no
  larger-eps schedule (and the checkpoints 0.22 / 0.06 / 0.03 x 100 iterations);
- APGD-T (targeted DLR): the same, 9 target classes;
- FAB-T (targeted FAB): 100 iterations, 1 restart, 9 target classes, alpha_max 0.1, eta 1.05,
  beta 0.9;
- Square: 5000 queries, p_init 0.8, 1 restart, margin loss, no rescaled schedule;

run in that order on the points still robust (the worst case over the four is kept). With fewer
than 10 classes the targeted attacks use ``n_classes - 1`` targets; below 4 classes the
targeted DLR loss is undefined and the attack refuses. The seed is fixed by the caller (the
original falls back to the clock), and the global RNG state is restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..report import duration
from .pgd import project

APGD_ITERS = 100
APGD_RESTARTS = 1
APGD_RHO = 0.75  # the step-size decay's threshold (``thr_decr``)
TARGETS = 9
FAB_ITERS = 100
FAB_STEP = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8
ATTACKS = ["apgd-ce", "apgd-t", "fab-t", "square"]


def _package():
    try:
        import pyautoattack
    except ImportError:
        raise UsageError(
            "AutoAttack needs the pyautoattack package", "pip install 'pyautoattack>=0.2,<0.3'"
        ) from None
    return pyautoattack


def describe() -> str:
    version = getattr(_package(), "__version__", "?")
    return (
        f"AutoAttack standard (pyautoattack {version}): APGD-CE {APGD_ITERS} iters {APGD_RESTARTS} restart rho {APGD_RHO}, "
        f"APGD-T {APGD_ITERS} iters {TARGETS} targets, FAB-T {FAB_ITERS} iters {TARGETS} targets, "
        f"Square {SQUARE_QUERIES} queries"
    )


# forward passes per image of each attack, relative to APGD-CE's (100 x input gradient): APGD-T
# 9 targets x 100, FAB-T 9 x 100 at about 1.5x a gradient, Square 5000 forwards at 1/2 a gradient
# (see the README's cost table); the estimate of what is left scales the measured speed by these
RELATIVE_COST = {"apgd-ce": 1.0, "apgd-t": 9.0, "fab-t": 13.5, "square": 25.0}
_AFTER = re.compile(r"robust accuracy after ([A-Z-]+): ([0-9.]+)%")


class _Forward(logging.Handler):
    """The package's log: its warnings to ``log``; from its progress messages (verbose), one line
    per finished attack to ``progress``: images still robust, seconds, and an estimate of the rest
    (the later attacks run only on the images still robust)."""

    def __init__(self, log, progress, n: int):
        super().__init__(logging.DEBUG)
        self.log, self.progress, self.n = log, progress, n
        self.start = self.last = time.perf_counter()
        self.attacked = n  # images the current attack runs on
        self.attack = ATTACKS[0]

    def emit(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            if self.log is not None:
                self.log(f"autoattack: {message}")
            return
        if self.progress is None:
            return
        if message.startswith("running "):
            self.attack, self.last = message.split(" ", 1)[1], time.perf_counter()
            return
        m = _AFTER.match(message)
        if m is None:
            return
        now = time.perf_counter()
        robust = round(float(m.group(2)) * self.n / 100)
        rest = ATTACKS[ATTACKS.index(self.attack) + 1:] if self.attack in ATTACKS else []
        per_unit = (now - self.last) / max(self.attacked * RELATIVE_COST.get(self.attack, 1.0), 1)
        left = per_unit * robust * sum(RELATIVE_COST[a] for a in rest)
        more = f", {', '.join(rest)} to run on {robust} (up to about {duration(left)})" if rest and robust else ""
        self.progress(f"autoattack: {self.attack} done, {robust}/{self.n} images still robust, "
                      f"{duration(now - self.start)} elapsed{more}")
        self.attacked = robust


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, seed: int = 0, log=None, progress=None) -> Tensor:
    """Adversarial images from the standard AutoAttack ensemble (L-inf, ``eps``); ``log``
    receives the package's warnings, ``progress`` a line after each of its attacks."""
    pkg = _package()
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    if n_classes < 4:
        raise UsageError(
            f"AutoAttack's targeted attacks need at least 4 classes, the model has {n_classes}",
            "use pgd20 or cw20 instead",
        )
    targets = min(TARGETS, n_classes - 1)
    adversary = pkg.AutoAttack(model, norm="Linf", eps=float(eps), version="standard", seed=int(seed), device=x.device)
    adversary.attacks_to_run = list(ATTACKS)
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter, apgd.n_restarts, apgd.eot_iter, apgd.thr_decr = APGD_ITERS, APGD_RESTARTS, 1, APGD_RHO
        apgd.use_rs, apgd.use_largereps = True, False
        # the step-size checkpoints, which the package derives from n_iter when it builds the attack
        apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = (max(int(f * APGD_ITERS), 1) for f in (0.22, 0.06, 0.03))
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_iter, adversary.fab.n_restarts, adversary.fab.n_target_classes = FAB_ITERS, 1, targets
    for name, value in FAB_STEP.items():
        setattr(adversary.fab, name, value)
    sq = adversary.square
    sq.n_queries, sq.p_init, sq.n_restarts, sq.loss, sq.rescale_schedule = SQUARE_QUERIES, SQUARE_P_INIT, 1, "margin", False
    adversary.verbose = progress is not None  # its progress messages, which _Forward turns into lines

    logger = logging.getLogger("auto-attack")
    handler = _Forward(log, progress, x.shape[0])
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    level = logger.level
    logger.setLevel(logging.DEBUG if progress is not None else logging.WARNING)
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        # what the package prints is for people: stderr, so that stdout stays data
        with torch.random.fork_rng(devices=devices), contextlib.redirect_stdout(sys.stderr):
            x_adv, _ = adversary.run_standard_evaluation(x.detach(), y.detach(), batch_size=x.shape[0])
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)
    return project(x_adv.detach(), x, eps)  # float noise at the ball's edge; AutoAttack keeps to the ball
