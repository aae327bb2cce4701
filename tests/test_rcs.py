"""RCS (--coreset): the greedy selection against the authors' algorithm written out in float64
(tests/reference/rcs.py), when it selects, that a run trains on the selection, and that a
resumed run keeps it."""

import copy

import pytest
import torch

from advcl_cli.settings.layering import resolve
from advcl_cli.engine.pretrain import make_method, pretrain
from advcl_cli.methods import rcs
from advcl_cli.methods.acl import ACL
from advcl_cli.settings import PretrainSettings
from nets import acl_net
from reference import rcs as reference

N, VAL, B, SIZE = 48, 6, 8, 16


def method(**flags):
    return make_method(resolve(PretrainSettings, {"method": "acl", "arch": "resnet18-tiny", "pgd_steps": 2, **flags}), N)


def test_the_selection_equals_the_authors_greedy_in_float64():
    m = method(coreset=0.5)  # 24 of 48 images: 3 rounds over 6 candidate batches of 8
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    val = torch.randint(0, 256, (VAL, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    start = acl_net()
    head = copy.deepcopy(start.proj.state_dict())

    ours, gains = copy.deepcopy(start), []
    chosen = rcs.select(m, ours, images, val, fraction=0.5, batch_size=B, gen=torch.Generator().manual_seed(7), gains=gains)

    theirs, gen = copy.deepcopy(start), torch.Generator().manual_seed(7)
    ref_chosen, ref_gains, _ = reference.select(theirs, images, val, lambda b: m.views(b, gen, torch.float64)[:2],
                                                gen=gen, fraction=0.5, batch_size=B, pgd_iter=2)
    assert chosen.tolist() == ref_chosen and len(chosen) == 3 * B
    assert len(gains) == len(ref_gains) == 3
    for a, b in zip(gains, ref_gains):  # every round's gains: the head steps and validation gradients between
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for k, v in ours.proj.state_dict().items():  # the head is restored
        assert torch.equal(v, head[k]), k


def test_the_validation_divergence_is_the_authors_kl_of_minmax_scaled_projections():
    g = torch.Generator().manual_seed(0)
    z_adv, z_clean = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    q = (z_adv - z_adv.min(1, keepdim=True).values) / (z_adv.max(1, keepdim=True).values - z_adv.min(1, keepdim=True).values) + 1e-8
    p = (z_clean - z_clean.min(1, keepdim=True).values) / (z_clean.max(1, keepdim=True).values - z_clean.min(1, keepdim=True).values) + 1e-8
    assert torch.allclose(rcs.divergence(z_adv, z_clean), (q * (q.log() - p.log())).mean(), rtol=1e-12)
    assert torch.allclose(rcs.divergence(z_adv, z_clean), reference.kl_loss(z_adv.clone(), z_clean.clone()), rtol=1e-12)


def test_selections_follow_the_authors_schedule_and_the_split_holds_out_one_percent():
    s = resolve(PretrainSettings, {"method": "acl", "coreset": 0.2, "batch_size": 512})
    core = rcs.Coreset(s, 50_000)
    assert [e for e in range(200) if core.selects(e)] == [100, 120, 140, 160, 180]  # 1-based 101, 121, ...
    late = rcs.Coreset(s.model_copy(update={"coreset_warmup": 21}), 50_000)
    assert [e for e in range(50) if late.selects(e)] == [20, 40]  # 1-based 21: (21 - 1) % 20 == 0
    assert (len(core.train), len(core.val)) == (49_500, 500) and not set(core.train.tolist()) & set(core.val.tolist())
    calls, used = [], []
    core._select = lambda *args: calls.append(1) or torch.arange(4)
    batches = type("B", (), {"use": lambda self, p: used.append(p)})()
    core.selected, core.selected_at = torch.arange(8), 100  # a state saved mid-epoch 101, after its selection
    core.start_epoch(100, None, None, None, batches, None)
    core.start_epoch(120, None, None, None, batches, None)
    assert len(calls) == 1 and len(used[0]) == 8 and len(used[1]) == 4  # epoch 101 keeps the state's selection
    with pytest.raises(Exception, match="less than one batch"):
        rcs.Coreset(s.model_copy(update={"coreset": 0.01}), 50_000)


def record_steps(monkeypatch):
    """The dataset positions every training step sees, per epoch; the selections made."""
    seen, selections = {}, []
    real_step, real_select, real_start = ACL.step, rcs.select, rcs.Coreset.start_epoch

    def step(self, model, batch, indices, gen, ctx=None):
        seen.setdefault(self._epoch_seen, []).extend(indices.tolist())
        return real_step(self, model, batch, indices, gen, ctx) if ctx is not None else real_step(self, model, batch, indices, gen)

    def start_epoch(self, epoch, method, *args):
        method._epoch_seen = epoch
        return real_start(self, epoch, method, *args)

    def select(*args, **kwargs):
        selections.append(1)
        return real_select(*args, **kwargs)

    monkeypatch.setattr(ACL, "step", step)
    monkeypatch.setattr(rcs.Coreset, "start_epoch", start_epoch)
    monkeypatch.setattr(rcs, "select", select)
    return seen, selections


SMALL = ["--dataset", "digits", "--limit", "200", "--image-size", "16", "--arch", "resnet18-tiny", "--batch-size", "16",
         "--pgd-steps", "1", "--device", "cpu"]


def test_a_coreset_run_trains_on_every_image_in_the_warmup_then_on_the_selection(run_cli, monkeypatch, tmp_path):
    seen, selections = record_steps(monkeypatch)
    code, out, err = run_cli("pretrain", "--method", "acl", *SMALL, "--epochs", "2", "--coreset", "0.2",
                             "--coreset-warmup", "2", "--coreset-every", "1", "--out", tmp_path / "run")
    assert code == 0, err
    from advcl_cli.checkpoint import load_state

    selected = load_state(tmp_path / "run" / "state.safetensors")["extra"]["coreset"]["selected"].tolist()
    core = rcs.Coreset(resolve(PretrainSettings, {"method": "acl", "coreset": 0.2, "batch_size": 16}), 200)
    assert sorted(seen[0]) == core.train.tolist()  # the warm-up: every image but the held-out 1 %
    assert len(selections) == 1 and len(selected) == 2 * 16  # int(int(198 x 0.2) / 16) = 2 batches
    assert sorted(seen[1]) == sorted(selected) and set(selected) <= set(core.train.tolist())
    assert "RCS: 2 images held out to select on; a coreset of 0.2 of 198 images from epoch 2" in err


def test_a_resumed_run_keeps_the_selection(monkeypatch, tmp_path):
    settings = resolve(PretrainSettings, {"method": "dynacl", "dataset": "digits", "limit": 200, "image_size": 16,
                                          "arch": "resnet18-tiny", "batch_size": 16, "pgd_steps": 1, "epochs": 3,
                                          "coreset": 0.2, "coreset_warmup": 1, "coreset_every": 3, "device": "cpu",
                                          "save_every": 1})
    seen, selections = record_steps(monkeypatch)
    pretrain(settings.model_copy(update={"out": tmp_path / "whole"}))
    whole = dict(seen)
    assert len(selections) == 1 and len(whole[0]) == 32 and sorted(whole[1]) == sorted(whole[0])
    seen.clear(), selections.clear()

    real = ACL.step

    def stop_in_epoch_2(self, *args, **kwargs):
        if self._epoch_seen == 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ACL, "step", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(settings.model_copy(update={"out": tmp_path / "cut"}))
    monkeypatch.setattr(ACL, "step", real)
    seen2, selections2 = record_steps(monkeypatch)
    pretrain(settings.model_copy(update={"out": tmp_path / "cut"}), resume=True)
    assert not selections2  # no new selection: the state's
    assert seen2[1] == whole[1] and seen2[2] == whole[2]


def test_a_dynacl_coreset_encoder_is_dynacl_rcs_with_its_published_numbers(tmp_path):
    from advcl_cli.benchmark.reported import load_reported
    from advcl_cli.engine.finetune import protocol

    m = make_method(resolve(PretrainSettings, {"method": "dynacl", "coreset": 0.2}), 50_000)
    assert m.checkpoint_name == "dynacl-rcs" and method().checkpoint_name == "acl"
    assert protocol("dynacl-rcs", "aff", "cifar10") == protocol("dynacl", "aff", "cifar10")
    cell, source, _ = load_reported().lookup("dynacl-rcs", "cifar10", "slf")
    assert (cell.aa, cell.sa) == (44.29, 77.14) and "robustssl" in source.url


def test_two_processes_select_what_one_does_and_train_on_it(tmp_path):
    """Under torchrun (2 gloo processes) rank 0 selects, broadcasts, and every rank trains on the
    selection (a rank on other images would take another number of steps and stop the job): the
    selection is one process's."""
    import subprocess
    import sys

    from advcl_cli.checkpoint import load_state
    from test_distributed import env1, launcher
    from waiting import HANG_S

    small = dict(method="acl", dataset="digits", limit=100, image_size=8, arch="resnet18-tiny", batch_size=8,
                 pgd_steps=1, device="cpu", epochs=1, coreset=0.2, coreset_warmup=1, coreset_every=1)
    pretrain(resolve(PretrainSettings, {**small, "out": tmp_path / "one"}))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in small.items()]
    cmd = [sys.executable, *launcher(2), "-m", "advcl_cli", "pretrain", *flags, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, env=env1())
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_state(tmp_path / name / "state.safetensors")["extra"]["coreset"]["selected"] for name in ("one", "two"))
    assert torch.equal(one, two) and 8 < len(one) <= 16  # int(int(99 x 0.2) / 8) = 2 batches (one may be the last, of 3)
