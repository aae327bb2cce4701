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


SMALL = ["--dataset", "digits", "--limit", "32", "--image-size", "16", "--device", "cpu"]


def pretrain_finetune_eval(run_cli, tmp_path, *flags) -> dict:
    """Pretrain ``flags`` (1 epoch of resnet18-tiny on 32 digits at 16x16), finetune with SLF and
    evaluate 8 images under PGD-3, each asserted to succeed; the pretrain's JSON document."""
    import json

    code, enc, err = run_cli("pretrain", *flags, *SMALL, "--arch", "resnet18-tiny", "--epochs", "1",
                             "--batch-size", "16", "--pgd-steps", "1", "--out", tmp_path / "pretrain", "--json")
    assert code == 0, err
    doc = json.loads(enc)
    code, clf, err = run_cli("finetune", doc["path"], "--scheme", "slf", "--epochs", "1", "--batch-size", "16",
                             "--attack-steps", "1", "--eval-limit", "8", *SMALL, "--out", tmp_path / "slf")
    assert code == 0, err
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd3", "--limit", "8", "--image-size", "16", "--json")
    assert code == 0 and json.loads(out)["n"] == 8, err
    return doc
