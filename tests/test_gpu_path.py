"""The GPU path walked on the CPU: bf16 autocast and channels_last (compile: test_compile.py).

A GPU run switches on bf16 autocast and channels_last (``--precision auto``,
``--channels-last auto``); the same switches mean the same on the CPU (CPU autocast computes
in bf16), so these tests run the engines' own code with them on. Each test observes the
feature itself, never a flag: a forward hook on every ``Conv2d`` reads the dtype and memory
format of what the convolutions computed, so a switch that is silently ignored (or a network
a method keeps beside the model, such as DeACL's teacher or DynACL's momentum encoder, left
behind) fails the test.

Tolerances (measured on resnet18-tiny, 8 images, one step): bf16 pretraining losses are within
0.3-1.2 % of fp32's; the tests allow 5 %. Accuracies on a fixed batch may flip an image whose
logits are close, so they are compared within 2 images of 16.
"""

import copy
import json

import pytest
import torch
from torch import nn

from advcl_cli.checkpoint import load_checkpoint, save_model
from advcl_cli.settings.layering import resolve
from advcl_cli.data.augment import to_float
from advcl_cli.data.registry import load_dataset
from advcl_cli.engine.evaluate import evaluate
from advcl_cli.engine.finetune import finetune
from advcl_cli.engine.loop import Loop
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.methods import BUILTIN
from advcl_cli.models import create_model
from advcl_cli.settings import FinetuneSettings, PretrainSettings

METHODS = ["advcl", "acl", "dynacl", "air", "dynacl-air", "deacl", "simclr", "rocl"]
LOSS_RTOL = 0.05


class ConvWatch:
    """Records, for every Conv2d forward, the output's dtype and whether it is channels_last."""

    def __enter__(self):
        self.seen: set[tuple[torch.dtype, bool]] = set()

        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                self.seen.add((output.dtype, output.is_contiguous(memory_format=torch.channels_last)
                               and not output.is_contiguous()))

        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A SimCLR encoder for DeACL to distil."""
    torch.manual_seed(3)
    net = create_model("resnet18-tiny", bn_sets=("normal",), proj_dim=16)
    return str(save_model(tmp_path_factory.mktemp("teacher") / "simclr.safetensors", net, kind="encoder",
                          method="simclr", dataset="digits"))


def pretrain_settings(method, teacher, **kw):
    values = dict(method=method, dataset="digits", arch="resnet18-tiny", limit=8, batch_size=8, image_size=16,
                  epochs=1, device="cpu", lr=0.1)
    values.update(kw)
    if method != "simclr":
        values["pgd_steps"] = 1
    if method == "deacl":
        values["teacher"] = teacher
    return resolve(PretrainSettings, values)


def run_pretrain(method, teacher, out, monkeypatch, **kw):
    """One pretraining step through the engine; (result, weights as the loop got them)."""
    start = {}
    real_run = Loop.run

    def run(self, *args, **kwargs):  # the weights the first step starts from
        start.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Loop, "run", run)
    with ConvWatch() as watch:
        result = pretrain(pretrain_settings(method, teacher, out=out, **kw))
    return result, start, watch.seen


def test_every_builtin_method_is_walked():
    assert sorted(METHODS) == sorted(BUILTIN)


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_step_in_bf16_and_channels_last_matches_fp32(method, teacher, tmp_path, monkeypatch):
    ref, _, seen32 = run_pretrain(method, teacher, "fp32", monkeypatch, precision="fp32", channels_last="off")
    fast, start, seen16 = run_pretrain(method, teacher, "bf16", monkeypatch, precision="bf16", channels_last="on")
    assert seen32 == {(torch.float32, False)}
    assert seen16 == {(torch.bfloat16, True)}  # every convolution computed in bf16, channels_last
    loss = fast.metrics["loss"]
    assert torch.isfinite(torch.tensor(loss)) and loss == pytest.approx(ref.metrics["loss"], rel=LOSS_RTOL)
    after = load_checkpoint(fast.path).tensors
    moved = [k for k in after if k in start and after[k].is_floating_point() and not torch.equal(after[k], start[k])]
    assert any("conv" in k for k in moved), "the bf16 step did not update the weights"
    assert fast.runtime["precision"] == "bf16" and fast.runtime["channels_last"] is True
    assert load_checkpoint(fast.path).meta.config["runtime"] == fast.runtime  # what ran, in the checkpoint


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=16)
    return save_model(tmp_path_factory.mktemp("enc") / "enc.safetensors", net, kind="encoder", method="acl",
                      dataset="digits", eps=8 / 255)


def run_finetune(encoder, scheme, out, **kw):
    settings = resolve(FinetuneSettings, dict(scheme=scheme, epochs=1, limit=16, batch_size=16, image_size=16,
                                              eval_limit=16, attack_steps=2, device="cpu", out=out, lr=0.05, **kw))
    with ConvWatch() as watch:
        result = finetune(settings, load_checkpoint(encoder))
    return result, watch.seen


@pytest.mark.parametrize("scheme", ["slf", "alf", "aff", "autolora"])
def test_finetune_step_in_bf16_and_channels_last_matches_fp32(scheme, encoder):
    ref, seen32 = run_finetune(encoder, scheme, "fp32", precision="fp32", channels_last="off")
    fast, seen16 = run_finetune(encoder, scheme, "bf16", precision="bf16", channels_last="on")
    assert seen32 == {(torch.float32, False)}
    # the step in bf16; the final clean / PGD-20 evaluation in fp32 (by design), both channels_last
    assert seen16 == {(torch.bfloat16, True), (torch.float32, True)}
    m32 = json.loads((ref.run_dir / "metrics.jsonl").read_text())
    m16 = json.loads((fast.run_dir / "metrics.jsonl").read_text())
    assert m16["loss"] == pytest.approx(m32["loss"], rel=LOSS_RTOL)
    assert abs(m16["train_acc"] - m32["train_acc"]) <= 2 / 16
    for key in ("clean_acc", "pgd20_acc"):
        assert abs(fast.metrics[key] - ref.metrics[key]) <= 2 / 16, key
    assert fast.runtime["precision"] == "bf16" and fast.runtime["channels_last"] is True


@pytest.fixture(scope="module")
def classifier():
    """An untrained classifier whose BN statistics are those of the digits: its predictions
    vary with the image (a fresh one predicts one class everywhere, which no attack can change,
    and AutoAttack's Square would spend its 5000 queries on every image)."""
    torch.manual_seed(1)
    net = create_model("resnet18-tiny", bn_sets=("normal",), num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain average over the passes
    net.train()
    with torch.no_grad():
        net(to_float(load_dataset("digits", "train", limit=64, image_size=16).images))
    return net.eval()


@pytest.mark.parametrize("attack", ["pgd20", "autoattack"])
def test_evaluation_in_bf16_and_channels_last_matches_fp32(attack, classifier):
    data = load_dataset("digits", "test", limit=16, image_size=16)
    results = {}
    for precision, cl in (("fp32", False), ("bf16", True)):
        with ConvWatch() as watch:
            results[precision] = evaluate(copy.deepcopy(classifier), data, [attack], [8 / 255], batch_size=16, device="cpu",
                                          precision=precision, channels_last=cl)
        assert watch.seen == {(torch.bfloat16 if precision == "bf16" else torch.float32, cl)}
    a, b = results["fp32"], results["bf16"]
    assert a["clean_acc"] > 0  # the attack has images to work on
    assert abs(a["clean_acc"] - b["clean_acc"]) <= 2 / 16
    assert abs(a["robust"][0]["robust_acc"] - b["robust"][0]["robust_acc"]) <= 2 / 16
    assert b["runtime"]["precision"] == "bf16" and b["runtime"]["channels_last"] is True
