"""No host sync per training step: the GPU never waits for Python inside the hot loop.

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``if t:``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``) waits for every queued kernel. The
training loop reads its sums once per logging interval and at the end of an epoch; a step
must read nothing. ``torch.cuda.set_sync_debug_mode`` cannot run on a CPU, so these tests
count the calls themselves: every such call made inside ``Loop.run`` outside ``end_epoch`` is
counted, for an epoch of 2 steps and one of 4 (logging only at the epoch's last step), and
the per-step count (their difference over 2) must be 0 for every method and scheme. A step
that adds a sync fails the test.
"""

import pytest
import torch

from advcl_cli.checkpoint import load_checkpoint, save_model
from advcl_cli.settings.layering import resolve
from advcl_cli.engine import loop as loop_module
from advcl_cli.engine.finetune import finetune
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.models import create_model
from advcl_cli.settings import FinetuneSettings
from test_gpu_path import METHODS, pretrain_settings, teacher  # noqa: F401 (fixture)

READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Counts host reads of tensors made while ``on``."""

    def __init__(self, monkeypatch):
        self.count, self.on, self.where = 0, False, []
        for name in READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                if self.on:
                    self.count += 1
                    self.where.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        real_run = loop_module.Loop.run

        def run(loop, start, epochs, end_epoch):
            def quiet_end(done, metrics):
                self.on = False
                end_epoch(done, metrics)
                self.on = True

            self.on = True
            try:
                return real_run(loop, start, epochs, quiet_end)
            finally:
                self.on = False

        monkeypatch.setattr(loop_module.Loop, "run", run)
        monkeypatch.setattr(loop_module, "LOG_EVERY", 1000)  # progress read at each epoch's last step only


def syncs_per_step(monkeypatch, train) -> float:
    """(syncs of an epoch of 4 steps - those of 2 steps) / 2, for ``train(images)``."""
    counts = []
    for images in (16, 32):
        with monkeypatch.context() as m:
            counter = SyncCounter(m)
            train(images)
            counts.append((counter.count, counter.where))
    (two, where2), (four, where4) = counts
    return (four - two) / 2, where4


@pytest.mark.parametrize("method", METHODS)
def test_a_pretraining_step_reads_nothing_on_the_host(method, teacher, monkeypatch):
    def train(images):
        pretrain(pretrain_settings(method, teacher, limit=images, out=f"run{images}"))

    per_step, where = syncs_per_step(monkeypatch, train)
    assert per_step == 0, f"{method}: {per_step} host reads per step ({where})"


@pytest.mark.parametrize("scheme", ["slf", "alf", "aff"])
def test_a_finetuning_step_reads_nothing_on_the_host(scheme, tmp_path, monkeypatch):
    torch.manual_seed(0)
    enc = save_model(tmp_path / "enc.safetensors", create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=16),
                     kind="encoder", method="acl", dataset="digits", eps=8 / 255)

    def train(images):
        settings = resolve(FinetuneSettings, dict(scheme=scheme, epochs=1, limit=images, batch_size=8, image_size=16,
                                                  eval_limit=8, attack_steps=1, device="cpu", out=f"ft{images}"))
        finetune(settings, load_checkpoint(enc))

    per_step, where = syncs_per_step(monkeypatch, train)
    assert per_step == 0, f"{scheme}: {per_step} host reads per step ({where})"


def test_the_counter_sees_a_sync_added_to_the_step(teacher, monkeypatch):
    """The check itself: a step that reads its loss (as a per-step ``.item()`` would) is caught."""
    real_update = loop_module.FiniteGuard.update

    def update(self, loss, step):
        float(loss)  # a per-step host read
        return real_update(self, loss, step)

    monkeypatch.setattr(loop_module.FiniteGuard, "update", update)

    def train(images):
        pretrain(pretrain_settings("simclr", teacher, limit=images, out=f"run{images}"))

    per_step, _ = syncs_per_step(monkeypatch, train)
    assert per_step == 1
