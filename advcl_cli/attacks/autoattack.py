"""AutoAttack (Croce & Hein, ICML 2020) through the maintained ``pyautoattack``: its versions and
its components alone, under the L-inf or the L2 norm.

``pyautoattack`` (0.2.x on PyPI, MIT) repackages the authors' fra31/auto-attack code. We build
its ``AutoAttack(version=...)`` and then set every component to that version's settings
explicitly, so a change of the package's defaults cannot silently weaken the attack. Every
version shares:

- APGD (CE, or DLR in plus/rand): 100 iterations, step-size decay rho 0.75, random start, no
  larger-eps schedule (and the checkpoints 0.22 / 0.06 / 0.03 x 100 iterations);
- APGD-T (targeted DLR): 100 iterations, 1 restart, EOT 1, 9 target classes;
- FAB (FAB-T: targeted, 1 restart): 100 iterations, 9 target classes, alpha_max 0.1, eta 1.05,
  beta 0.9;
- Square: 5000 queries, p_init 0.8, 1 restart, margin loss, no rescaled schedule;

and the versions differ in what runs, in that order on the points still robust (the worst case
is kept), and in APGD's restarts and EOT iterations:

- ``autoattack`` (standard): APGD-CE, APGD-T, FAB-T, Square; APGD 1 restart, EOT 1;
- ``autoattack-plus``: APGD-CE, APGD-DLR, FAB, Square, APGD-T, FAB-T; APGD and FAB 5 restarts;
- ``autoattack-rand`` (randomised defences): APGD-CE, APGD-DLR with 20 EOT iterations, 1 restart;
- ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``: one component alone, with the standard settings.

With fewer than 10 classes the targeted attacks use ``n_classes - 1`` targets; below 4 classes
the targeted attacks (and below 3 the DLR loss) are undefined and the attack refuses. The seed
is fixed by the caller (the original falls back to the clock), and the global RNG state is
restored afterwards.
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
APGD_RHO = 0.75  # the step-size decay's threshold (``thr_decr``)
TARGETS = 9
FAB_ITERS = 100
FAB_STEP = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8
ATTACKS = ["apgd-ce", "apgd-t", "fab-t", "square"]
# advcl's name -> (the package's version, what runs)
VERSIONS = {
    "autoattack": ("standard", ATTACKS),
    "autoattack-plus": ("plus", ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]),
    "autoattack-rand": ("rand", ["apgd-ce", "apgd-dlr"]),
    **{component: ("standard", [component]) for component in ATTACKS},
}
# per package version: (APGD restarts, APGD EOT iterations, FAB restarts); rand's FAB restarts
# are the package's constructor value (rand runs no FAB)
SCHEDULE = {"standard": (1, 1, 1), "plus": (5, 1, 5), "rand": (1, 20, 5)}
MIN_CLASSES = {"apgd-t": 4, "fab-t": 4, "apgd-dlr": 3}  # targeted: 1 + 3 targets; DLR: the third logit
PACKAGE_NORMS = {"linf": "Linf", "l2": "L2"}


def _package():
    try:
        import pyautoattack
    except ImportError:
        raise UsageError(
            "AutoAttack needs the pyautoattack package", "pip install 'pyautoattack>=0.2,<0.3'"
        ) from None
    return pyautoattack


def describe(name: str = "autoattack", norm: str = "linf") -> str:
    version = getattr(_package(), "__version__", "?")
    package_version, attacks = VERSIONS[name]
    apgd_restarts, eot, fab_restarts = SCHEDULE[package_version]
    parts = {
        "apgd-ce": f"APGD-CE {APGD_ITERS} iters {apgd_restarts} restart(s) rho {APGD_RHO} EOT {eot}",
        "apgd-dlr": f"APGD-DLR {APGD_ITERS} iters {apgd_restarts} restart(s) EOT {eot}",
        "apgd-t": f"APGD-T {APGD_ITERS} iters {TARGETS} targets",
        "fab": f"FAB {FAB_ITERS} iters {fab_restarts} restarts",
        "fab-t": f"FAB-T {FAB_ITERS} iters {TARGETS} targets",
        "square": f"Square {SQUARE_QUERIES} queries",
    }
    title = f"AutoAttack {package_version}" if name.startswith("autoattack") else f"AutoAttack's {name} alone"
    return f"{title} ({PACKAGE_NORMS[norm]}, pyautoattack {version}): " + ", ".join(parts[a] for a in attacks)


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


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, seed: int = 0, log=None, progress=None,
               version: str = "autoattack", norm: str = "linf") -> Tensor:
    """Adversarial images from an AutoAttack version or component (``VERSIONS``) at ``eps`` under
    ``norm`` (linf or l2); ``log`` receives the package's warnings, ``progress`` a line after
    each of its attacks."""
    adversary = build(model, x, eps, seed=seed, version=version, norm=norm)
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
    return project(x_adv.detach(), x, eps, norm)  # float noise at the ball's edge; AutoAttack keeps to the ball


def build(model: nn.Module, x: Tensor, eps: float, *, seed: int = 0, version: str = "autoattack",
          norm: str = "linf"):
    """The package's ``AutoAttack`` for ``version`` with every setting written out (see above)."""
    pkg = _package()
    package_version, attacks = VERSIONS[version]
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    need = max((MIN_CLASSES.get(a, 2) for a in attacks), default=2)
    if n_classes < need:
        raise UsageError(
            f"{version} needs at least {need} classes (its targeted or DLR attacks), the model has {n_classes}",
            "use pgd20, cw20 or apgd-ce instead",
        )
    targets = min(TARGETS, n_classes - 1)
    adversary = pkg.AutoAttack(model, norm=PACKAGE_NORMS[norm], eps=float(eps), version=package_version,
                               seed=int(seed), device=x.device)
    adversary.attacks_to_run = list(attacks)
    apgd_restarts, eot, fab_restarts = SCHEDULE[package_version]
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter, apgd.thr_decr, apgd.use_rs, apgd.use_largereps = APGD_ITERS, APGD_RHO, True, False
        # the step-size checkpoints, which the package derives from n_iter when it builds the attack
        apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = (max(int(f * APGD_ITERS), 1) for f in (0.22, 0.06, 0.03))
    adversary.apgd.n_restarts, adversary.apgd.eot_iter = apgd_restarts, eot
    adversary.apgd_targeted.n_restarts, adversary.apgd_targeted.eot_iter = 1, 1
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_iter, adversary.fab.n_restarts, adversary.fab.n_target_classes = FAB_ITERS, fab_restarts, targets
    for name, value in FAB_STEP.items():
        setattr(adversary.fab, name, value)
    sq = adversary.square
    sq.n_queries, sq.p_init, sq.n_restarts, sq.loss, sq.rescale_schedule = SQUARE_QUERIES, SQUARE_P_INIT, 1, "margin", False
    adversary.verbose = False
    return adversary
