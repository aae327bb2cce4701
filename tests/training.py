"""Helpers for tests that train: a plain supervised loop for tests that need a trained
classifier (attacks need one), and a reporter that interrupts a run."""

import torch
import torch.nn.functional as F

from advcl_cli.report import Reporter


class InterruptAt(Reporter):
    """Raises KeyboardInterrupt (as Ctrl-C would) when the ``step``-th step (1-based) is done."""

    def __init__(self, step: int):
        self.step, self.steps = step, 0

    def advance(self, n=1, **info):
        self.steps += n
        if self.steps == self.step:
            raise KeyboardInterrupt


def fit(model, x, y, opt, *, epochs: int, batch_size: int):
    """Train ``model`` on (x, y) with cross-entropy, shuffling with the global torch RNG."""
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model
