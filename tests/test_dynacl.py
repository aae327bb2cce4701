"""DynACL pinned to an independent reference of the authors' step and schedules, its momentum
encoder, resume, and the command line."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from advcl_cli.checkpoint import load_state
from advcl_cli.settings.layering import resolve
from advcl_cli.data.augment import ViewSpec
from advcl_cli.distributed import DistContext
from advcl_cli.engine.finetune import protocol
from advcl_cli.engine.pretrain import make_method, pretrain
from advcl_cli.report import Reporter
from advcl_cli.methods import get_method, method_for
from advcl_cli.attacks.pgd import uniform_noise
from advcl_cli.methods.dynacl import DynACL, ema_update
from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD
from advcl_cli.settings import PretrainSettings
from nets import acl_family_net
from reference.dynacl_step import train_step, training_loop_schedules
from training import InterruptAt
from waiting import HANG_S

B, N, SIZE = 8, 16, 16
TOL = 1e-10
EPOCH = 149  # 0-based: the authors' epoch 150, strength 0.9, adversarial weight already 0.1


def settings(**overrides):
    return resolve(PretrainSettings, {"method": "dynacl", "arch": "resnet18-tiny", "device": "cpu", **overrides})


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["advcl"])


def sgd_step(params, loss):
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    opt.zero_grad()
    loss.backward()
    opt.step()


def images(seed=0):
    return torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def one_step(momentum_encoder: bool) -> dict:
    """advcl's step and the reference's on the same network, views and starts."""
    method = make_method(settings(momentum_encoder=momentum_encoder), N)
    assert method.model_config("resnet18-tiny") == {"bn_sets": ("normal", "pgd"), "proj_dim": 64, "proj_head": "mlp3",
                                                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    start = acl_family_net(method)
    k_start = copy.deepcopy(method.momentum_net)
    method.start_epoch(EPOCH)
    gen = torch.Generator().manual_seed(1)
    x1, x2 = method.views(images(), gen, torch.float64)
    noise = uniform_noise(x1, gen, count=2)

    attacked = copy.deepcopy(start)  # the attack alone, for its outputs (it changes no weight or statistic)
    a1, a2 = method.attack(attacked, x1, x2, noise, DistContext())
    ours = copy.deepcopy(start)
    loss, terms = method.loss(ours, (x1, x2), noise)
    sgd_step(ours.parameters(), loss)

    theirs, their_k = copy.deepcopy(start), copy.deepcopy(k_start)
    eps = method.settings.eps
    ref = train_step(theirs, their_k, x1, x2, eps * noise[0], eps * noise[1], EPOCH + 1)
    sgd_step(theirs.parameters(), ref["loss"])
    return dict(method=method, start=start, k_start=k_start, views=(x1, x2), noise=noise, a=(a1, a2), ours=ours,
                theirs=theirs, their_k=their_k, loss=loss, terms=terms, ref=ref)


@pytest.fixture(scope="module")
def runs():
    return {"momentum": one_step(True), "plain": one_step(False)}


@pytest.fixture(scope="module", params=["momentum", "plain"], ids=["momentum-encoder", "no-momentum-encoder"])
def run(request, runs):
    return runs[request.param]


def test_the_attacked_views_equal_the_reference(run):
    (a1, a2), ref, (x1, x2) = run["a"], run["ref"], run["views"]
    torch.testing.assert_close(a1, ref["a1"], rtol=0, atol=1e-12)
    torch.testing.assert_close(a2, ref["a2"], rtol=0, atol=1e-12)
    for a, x in ((a1, x1), (a2, x2)):  # not vacuous: the attack moved both views, within the ball
        assert 4 / 255 < float((a - x).abs().max()) <= 8 / 255 + 1e-12


def test_the_losses_equal_the_reference(run):
    terms, ref = run["terms"], run["ref"]
    assert run["loss"].dtype == torch.float64 and ref["weight"] == pytest.approx(1.1)
    for ours, theirs in ((run["loss"], ref["loss"]), (terms["clean"], ref["clean"]), (terms["adv"], ref["adv"])):
        assert abs(float(ours.detach()) - float(theirs.detach())) < TOL, (float(ours.detach()), float(theirs.detach()))
    assert float(terms["adv_weight"]) == pytest.approx(0.1) and float(terms["strength"]) == pytest.approx(0.9)


def test_weights_and_statistics_after_one_step_equal_the_reference(run, runs):
    start, ours, theirs = run["start"].state_dict(), run["ours"].state_dict(), run["theirs"].state_dict()
    assert max(float((ours[k] - start[k]).abs().max()) for k, _ in run["ours"].named_parameters()) > 1e-3
    for key in ours:  # parameters, and the running statistics of both BN sets
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=TOL, msg=key)
    k = run["method"].momentum_net
    if run is runs["plain"]:
        assert k is None and run["their_k"] is None
        return
    ours_k, theirs_k, k0 = k.state_dict(), run["their_k"].state_dict(), run["k_start"].state_dict()
    for key in ours_k:  # the EMA of the parameters; the buffers from its own forward passes on the second views
        torch.testing.assert_close(ours_k[key], theirs_k[key], rtol=0, atol=1e-12, msg=key)
    assert all(not torch.equal(ours_k[key], k0[key]) for key in ("backbone.conv1.weight",
                                                                  "backbone.bn1.sets.pgd.running_mean",
                                                                  "backbone.bn1.sets.normal.running_var"))


def test_ema_is_of_the_parameters_only_at_the_decay_and_from_the_weights_before_the_update(runs):
    run = runs["momentum"]
    method = run["method"]
    q0, k0, k1 = run["start"].state_dict(), run["k_start"].state_dict(), method.momentum_net.state_dict()
    names = {name for name, _ in method.momentum_net.named_parameters()}
    for name in names:
        assert torch.equal(k1[name], k0[name] * 0.99 + q0[name] * (1 - 0.99)), name
    for name in k1.keys() - names:  # buffers: one batch per set (train mode) added to its own statistics
        if name.endswith("num_batches_tracked"):
            assert int(k1[name]) == int(k0[name]) + 1, name
        else:
            assert not torch.allclose(k1[name], k0[name] * 0.99 + q0[name] * 0.01, atol=1e-6), name
    # the decay is the setting
    k, q = copy.deepcopy(run["k_start"]), run["start"]
    ema_update(k, q, 0.9)
    assert torch.equal(k.backbone.conv1.weight, k0["backbone.conv1.weight"] * 0.9 + q0["backbone.conv1.weight"] * (1 - 0.9))


# --- schedules ------------------------------------------------------------------------------


def test_schedules_at_the_authors_epochs_1_50_51_1000():
    """Written out from train_DynACL.py: strength 1 - (e - 1)/1000 taken at e = 1, 51, ...;
    w = (2/3) * 0.05 * floor(e / 50); LambdaLR(cosine_annealing(step, 1000, 1, 1e-6 / 5,
    warmup 10)) stepped after every epoch, so 1-based epoch e runs at step e - 1."""
    method = make_method(settings(), N)
    sched = method.schedule()
    low = 1e-6

    def cosine(step):
        return low + (5.0 - low) * 0.5 * (1 + math.cos((step - 10) / 990 * math.pi))

    expected = {1: (1.0, 0.0, 0.5), 50: (1.0, 1 / 30, cosine(49)), 51: (0.95, 1 / 30, cosine(50)),
                1000: (0.05, 2 / 3, cosine(999))}
    for epoch, (s, w, lr) in expected.items():
        e = epoch - 1
        assert method.strength(e) == pytest.approx(s, abs=1e-12), epoch
        assert method.adv_factor(e) - 1 == pytest.approx(w, abs=1e-12), epoch
        assert sched.lr(e, 0, 98) == pytest.approx(lr, rel=1e-12), epoch
        assert sched.lr(e, 97, 98) == sched.lr(e, 0, 98)  # stepped per epoch, not per iteration
        method.start_epoch(e)
        assert method.view_spec() == ViewSpec.dynacl(method.strength(e))
    assert sched.lr(8) == pytest.approx(4.5) and sched.lr(9) == sched.lr(10) == pytest.approx(5.0)


def test_schedules_follow_the_authors_training_loop_at_every_epoch():
    method = make_method(settings(), N)
    sched = method.schedule()
    for epoch, (s, a, lr) in training_loop_schedules().items():
        e = epoch - 1
        assert method.strength(e) == s and method.adv_factor(e) == a, epoch
        assert sched.lr(e) == pytest.approx(lr, rel=1e-12), epoch
    short = make_method(settings(epochs=120, strength_block=25), N)  # other blocks and lengths
    for epoch, (s, a, _) in training_loop_schedules(120, reload_frequency=25).items():
        assert (short.strength(epoch - 1), short.adv_factor(epoch - 1)) == (s, a), epoch


def test_views_at_a_strength_are_the_authors_reload():
    """``reload(s)``: RandomResizedCrop(32, scale=(1 - 0.9 s, 1)) with torchvision's default
    interpolation, flip 0.5, RandomApply(ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s), p=0.8 s),
    RandomGrayscale(0.2 s) (test_augment pins the views to these transforms)."""
    from torchvision import transforms as T

    for s in (1.0, 0.55, 0.05):
        spec = ViewSpec.dynacl(s)
        crop = T.RandomResizedCrop(32, scale=(1.0 - 0.9 * s, 1.0))
        jitter = T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)
        assert spec.scale == pytest.approx(crop.scale) and spec.ratio == pytest.approx(crop.ratio)
        assert crop.interpolation == T.InterpolationMode.BILINEAR and spec.interpolation == "bilinear"
        assert spec.jitter == pytest.approx((0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s))
        assert (1 - spec.jitter[0], 1 + spec.jitter[0]) == pytest.approx(jitter.brightness)
        assert (spec.jitter_p, spec.gray_p, spec.flip_p) == pytest.approx((0.8 * s, 0.2 * s, 0.5))


def test_defaults_and_finetuning_protocol():
    s = settings()
    assert (s.epochs, s.batch_size, s.optimizer, s.lr, s.weight_decay, s.warmup_epochs, s.min_lr) == (
        1000, 512, "lars", 5.0, 1e-6, 10, 1e-6)
    assert (s.momentum_encoder, s.ema_decay, s.strength_block, s.weight_swap, s.temperature, s.pgd_steps) == (
        True, 0.99, 50, pytest.approx(2 / 3), 0.5, 5)
    assert get_method("dynacl") is DynACL
    for name in ("dynacl", "dynacl++", "dynacl-air", "dynacl-air++"):
        assert method_for(name) is (DynACL if name != "dynacl-air" else get_method("dynacl-air"))  # DynACL-AIR: its own class
        # the benchmark's epochs when each mode runs alone: DynACL-AIR's SLF 5, DynACL-AIR++'s ALF 4
        slf_epochs = 5 if name == "dynacl-air" else 25
        assert protocol(name, "slf", "cifar10") == {"epochs": slf_epochs, "batch_size": 512, "lr": 0.01,
                                                    "milestones": [10, 20]}
        assert protocol(name, "alf", "cifar10")["epochs"] == (4 if name == "dynacl-air++" else 25)
        assert protocol(name, "alf", "cifar100")["lr"] == (0.05 if name in ("dynacl", "dynacl++") else 0.1)
        assert protocol(name, "aff", "cifar10") == {"epochs": 25, "batch_size": 128, "lr": 0.1, "milestones": [15, 20],
                                                    "dual_bn": True}


# --- through the engine -----------------------------------------------------------------------


COMMON = dict(dataset="digits", limit=16, batch_size=8, epochs=2, image_size=SIZE, pgd_steps=2, warmup_epochs=0)


def test_resume_with_the_momentum_encoder_is_bit_identical_and_saves_the_momentum_encoder(tmp_path):
    full = pretrain(settings(out=tmp_path / "full", **COMMON))
    cut = settings(out=tmp_path / "cut", **COMMON)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cut, InterruptAt(3))  # 2 steps per epoch: the first step of epoch 2
    resumed = pretrain(cut, Reporter(), resume=True)
    a, b = load_file(full.path), load_file(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = load_state(tmp_path / "full" / "state.safetensors")
    momentum = {k.removeprefix("momentum_encoder."): v for k, v in state["extra"]["method"].items()}
    assert momentum.keys() == a.keys() == state["model"].keys()
    assert all(torch.equal(a[k], momentum[k]) for k in a)  # the saved encoder is the momentum encoder
    assert not torch.equal(a["backbone.conv1.weight"], state["model"]["backbone.conv1.weight"])
    meta = metadata(full.path)
    assert meta["method"] == "dynacl" and meta["config"]["momentum_encoder"] is True
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["strength"], r["adv_weight"]) for r in lines] == [(1.0, 0.0), (1.0, 0.0)]


def test_without_the_momentum_encoder_the_network_is_saved(tmp_path):
    result = pretrain(settings(out=tmp_path / "run", momentum_encoder=False, **{**COMMON, "epochs": 1}))
    saved, state = load_file(result.path), load_state(tmp_path / "run" / "state.safetensors")
    assert state["extra"]["method"] == {}
    assert saved.keys() == state["model"].keys() and all(torch.equal(saved[k], state["model"][k]) for k in saved)
    meta = metadata(result.path)
    assert meta["config"]["momentum_encoder"] is False


def test_two_processes_match_one(tmp_path):
    """One DynACL step with the momentum encoder on 2 gloo processes x 4 images == 1 x 8, in
    float64: the trained network, the momentum encoder's parameters (EMA) and its BN statistics
    (it runs in train mode on the second views, so its BN must see the global batch)."""
    from test_distributed import WORKER, env1, torchrun

    for name, procs in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        if procs == 1:
            done = subprocess.run([sys.executable, WORKER, "dynacl", str(tmp_path / name)], capture_output=True, text=True,
                                  timeout=HANG_S, env=env1())
        else:
            done = torchrun(2, WORKER, "dynacl", str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(tmp_path / name / "dynacl.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and any(k.startswith("momentum_encoder.") for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-8, msg=key)
    assert not torch.equal(one["momentum_encoder.backbone.bn1.sets.pgd.running_mean"],
                           one["backbone.bn1.sets.pgd.running_mean"])
