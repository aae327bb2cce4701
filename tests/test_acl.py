"""ACL against an independent copy of the authors' step (tests/reference/acl_step.py) in
float64, on a tiny ACL-family network whose two BN sets differ (so a view sent through the
wrong set, or an attack in train mode, shows); its schedule, model and finetuning protocol."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.settings.layering import resolve
from advcl_cli.engine.finetune import protocol
from advcl_cli.engine.pretrain import make_method
from advcl_cli.methods.acl import contrastive_attack
from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD
from advcl_cli.settings import PretrainSettings
from nets import acl_net
from reference.acl_step import lars_step, reference_step

B, SIZE = 8, 32
TOL = 1e-10


def acl(**flags):
    return make_method(resolve(PretrainSettings, {"method": "acl", "arch": "resnet18-tiny", **flags}), B)


@pytest.fixture(scope="module")
def run():
    method = acl()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    x1, x2 = method.views(images, torch.Generator().manual_seed(1), torch.float64)
    uniform = torch.rand((2, B, 3, SIZE, SIZE), generator=g, dtype=torch.float64) * 2 - 1
    start = acl_net()

    ours = copy.deepcopy(start)
    loss, terms = method.loss(ours, (x1, x2), uniform)
    opt = method.optimizer(ours.parameters())
    opt.zero_grad()
    loss.backward()
    opt.step()

    theirs = copy.deepcopy(start)
    ref = reference_step(theirs, x1, x2, uniform)
    ref["loss"].backward()
    lars_step(list(theirs.parameters()))

    net = copy.deepcopy(start)
    s = method.settings
    a1, a2 = contrastive_attack(net, x1, x2, uniform, eps=s.eps, steps=s.pgd_steps, step_size=s.pgd_step_size,
                                temperature=s.temperature)
    return dict(method=method, views=(x1, x2), start=start, ours=ours, theirs=theirs, loss=loss, terms=terms,
                ref=ref, a1=a1, a2=a2)


def test_attacked_views_equal_the_reference(run):
    ref = run["ref"]
    for ours, theirs in ((run["a1"], ref["a1"]), (run["a2"], ref["a2"])):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)  # theirs keeps delta: rounding only
    x1, _ = run["views"]
    assert float((run["a1"] - x1).abs().max()) <= 8 / 255 + 1e-12
    assert float((run["a1"] - x1).abs().max()) > 4 / 255  # it moved


def test_losses_equal_the_reference(run):
    ref = run["ref"]
    assert abs(float(run["loss"].detach()) - float(ref["loss"].detach())) < TOL
    assert abs(float(run["terms"]["clean"]) - float(ref["clean"])) < TOL
    assert abs(float(run["terms"]["adv"]) - float(ref["adv"])) < TOL
    assert float(run["terms"]["adv"]) > float(run["terms"]["clean"])  # the attack raised its loss


def test_weights_and_bn_statistics_after_one_lars_step_equal_the_reference(run):
    ours, theirs, start = run["ours"].state_dict(), run["theirs"].state_dict(), run["start"].state_dict()
    moved = 0
    for key in ours:
        assert (ours[key].double() - theirs[key].double()).abs().max() < TOL, key
        moved += not torch.equal(ours[key], start[key])
    assert moved > 50  # the step changed the network
    # the attack ran in eval mode: each BN set's running statistics moved once (its train forward)
    for bn in ("normal", "pgd"):
        assert int(ours[f"backbone.bn1.sets.{bn}.num_batches_tracked"]) == 1
        assert int(ours[f"proj.bn3.sets.{bn}.num_batches_tracked"]) == 1


def test_the_loss_is_the_mean_of_two_nt_xents_written_out(run):
    """NT-Xent by hand, anchor by anchor, on the projections the step computes."""
    net = copy.deepcopy(run["start"])
    x1, x2 = run["views"]

    def nt_xent_by_hand(z1, z2, t=0.5):
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        n, total = z.shape[0], 0.0
        for i in range(n):
            pos = (i + n // 2) % n
            denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
            total -= float(z[i] @ z[pos]) / t - math.log(denom)
        return total / n

    with torch.no_grad():
        z = net.project(net.features(torch.cat([x1, x2]), "normal"), "normal")
    expected = nt_xent_by_hand(z[:B], z[B:])
    assert abs(float(run["terms"]["clean"]) - expected) < 1e-9


def test_defaults_schedule_and_model_are_the_authors():
    method = acl()
    s = method.settings
    assert (s.optimizer, s.lr, s.momentum, s.weight_decay, s.lars_eta) == ("lars", 5.0, 0.9, 1e-6, 1e-3)
    assert (s.epochs, s.batch_size, s.temperature, s.min_lr, s.pgd_steps) == (1000, 512, 0.5, 1e-6, 5)
    assert s.eps == pytest.approx(8 / 255) and s.pgd_step_size == pytest.approx(2 / 255)
    sched, n = method.schedule(), 98  # 50,000 images at 512: 98 steps per epoch
    assert sched.lr(0, 0, n) == pytest.approx(5.0 * 1 / (10 * n))  # linear warm-up from 0, per step
    assert sched.lr(9, n - 1, n) == pytest.approx(5.0 * (10 * n) / (10 * n))
    assert sched.lr(999, n - 1, n) == pytest.approx(1e-6)
    assert sched.lr(500, 0, n) != sched.lr(500, 50, n)  # stepped per iteration, not per epoch
    config = method.model_config("resnet18")
    assert config == {"bn_sets": ("normal", "pgd"), "proj_dim": 512, "proj_head": "mlp3",
                      "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    spec = method.view_spec()
    assert (spec.scale, spec.interpolation, spec.jitter, spec.jitter_p, spec.gray_p) == (
        (0.1, 1.0), "bicubic", (0.4, 0.4, 0.4, 0.1), 0.8, 0.2)


def test_the_finetuning_protocol_is_the_benchmarks_acl_one():
    assert protocol("acl", "slf", "cifar10") == {"epochs": 25, "batch_size": 512, "lr": 0.01, "milestones": [10, 20]}
    assert protocol("acl", "alf", "cifar100")["lr"] == 0.05
    aff = protocol("acl", "aff", "cifar10")
    assert (aff["epochs"], aff["batch_size"], aff["lr"], aff["milestones"], aff["dual_bn"]) == (100, 128, 0.1, [40, 60], True)
    assert protocol("acl-air", "aff", "cifar10") == aff  # ACL-AIR encoders finetune as ACL's


def test_acl_runs_offline_through_finetune_and_eval(run_cli, tmp_path):
    small = ["--dataset", "digits", "--limit", "32", "--image-size", "16", "--device", "cpu"]
    code, enc, err = run_cli("pretrain", "--method", "acl", *small, "--arch", "resnet18-tiny", "--epochs", "1",
                             "--batch-size", "16", "--pgd-steps", "1", "--out", tmp_path / "acl")
    assert code == 0, err
    from advcl_cli.checkpoint import load_checkpoint

    meta = load_checkpoint(enc.strip()).meta
    assert meta.method == "acl" and meta.config["optimizer"] == "lars" and meta.model["proj_head"] == "mlp3"
    for scheme in ("slf", "alf", "aff"):  # no flags beyond the small budget: the protocol's settings
        code, clf, err = run_cli("finetune", enc.strip(), "--scheme", scheme, "--epochs", "1", "--batch-size", "16",
                                 "--attack-steps", "1", "--eval-limit", "8", *small, "--out", tmp_path / scheme)
        assert code == 0, err
        clf_meta = load_checkpoint(clf.strip()).meta
        assert clf_meta.model["bn_sets"] == ["pgd"] and clf_meta.model["mean"] == list(IMAGENET_MEAN)
    assert "BN normal/pgd" in err  # AFF trained with both sets
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd3", "--limit", "8", "--image-size", "16", "--json")
    assert code == 0, err and json.loads(out)["n"] == 8


def test_aff_of_an_acl_encoder_keeps_both_bn_sets_and_trains_trades_through_them(tmp_path):
    """One AFF step: clean images through "normal", adversarial ones through "pgd" (the attack
    from x + 0.001 N(0, 1) on KL(p_clean || p_adv) in eval mode, the loss in train mode), and
    the classifier keeps the "pgd" set."""
    from advcl_cli.checkpoint import load_checkpoint, save_model
    from advcl_cli.engine.finetune import finetune
    from advcl_cli.report import Reporter
    from advcl_cli.models import backbone_with_bn_set
    from advcl_cli.settings import FinetuneSettings
    from test_finetune import ONE_STEP, first_batch, signed_ascent

    enc = acl_net(torch.float32).eval()
    # a dual-BN classifier with a random head (a new head starts at zero, where both routes give
    # the same uniform logits): finetuning continues from it as it is, both sets included
    torch.manual_seed(0)
    start = backbone_with_bn_set(enc, ("normal", "pgd"), num_classes=10)
    path = save_model(tmp_path / "clf0.safetensors", start, kind="classifier", method="acl", dataset="digits",
                      eps=8 / 255)
    encoder = load_checkpoint(path)
    settings = resolve(FinetuneSettings, dict(out=tmp_path / "aff", scheme="aff", **ONE_STEP))
    clf = load_checkpoint(finetune(settings, encoder, Reporter()).path)
    assert clf.model_config.bn_sets == ("pgd",)
    logged = json.loads((tmp_path / "aff" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    x, y, gen = first_batch(settings)
    model = encoder.build().eval()
    assert model.config.bn_sets == ("normal", "pgd")

    def kl_sum(logits_nat, logits_adv):
        return (F.softmax(logits_nat, 1) * (F.log_softmax(logits_nat, 1) - F.log_softmax(logits_adv, 1))).sum()

    with torch.no_grad():
        nat = model(x, "normal")
    start = x + 0.001 * torch.randn(x.shape, generator=gen)
    x_adv = signed_ascent(lambda z: model(z, "pgd"), x, start, lambda logits: kl_sum(nat, logits))
    model.train()
    logits_nat, logits_adv = model(x, "normal"), model(x_adv, "pgd")
    expected = F.cross_entropy(logits_nat, y).item() + 6.0 * (kl_sum(logits_nat, logits_adv) / len(y)).item()
    assert logged == pytest.approx(expected, rel=1e-5)
    single = backbone_with_bn_set(encoder.build(), "pgd", num_classes=10).train()  # what one BN set would give
    single.fc.load_state_dict(model.fc.state_dict())
    one_set = F.cross_entropy(single(x), y).item()
    assert abs(one_set - F.cross_entropy(logits_nat, y).item()) > 1e-3  # the two routes differ visibly
