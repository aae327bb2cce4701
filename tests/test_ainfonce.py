"""A-InfoNCE (``advcl pretrain --a-infonce ip|hn|iphn``) against an independent copy of the
authors' Asym-AdvCL step (tests/reference/ainfonce_step.py) in float64, on a tiny network whose
BN sets all differ (a view through the wrong set shows), with the scripts' weights; the adaptive
stop-gradient's accumulation and ramp; the resume state; a run through the CLI; the leaderboard
rows and the import its checkpoints reach."""

import copy
import json

import pytest
import torch

from advcl_cli.benchmark.reported import load_reported, reported_id
from advcl_cli.config import resolve
from advcl_cli.engine.pretrain import make_method, pretrain
from advcl_cli.methods import method_for
from advcl_cli.methods.advcl import AdvCL, attack
from advcl_cli.pseudolabels import save_labels
from advcl_cli.settings import PretrainSettings
from nets import advcl_net
from reference.ainfonce_step import AverageMeter, reference_step, script_args, stop_degree

B, N, KS, SIZE = 8, 16, (2, 5), 32
STEPS = 2  # PGD steps, both sides
TOL = 1e-10


def method_and_inputs(tmp_path, **flags):
    g = torch.Generator().manual_seed(0)
    labels = {k: torch.randint(0, k, (N,), generator=g) for k in KS}
    path = save_labels(tmp_path / "pl.safetensors", labels, dataset="t", split="train", encoder="x")
    method = make_method(resolve(PretrainSettings, {"arch": "resnet18-tiny", "pseudo_labels": path, "pgd_steps": STEPS,
                                                    **flags}), N)
    images = torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    indices = torch.randperm(N, generator=g)[:B]
    views = method.views(images, torch.Generator().manual_seed(1), torch.float64)
    uniform = torch.rand((2, B, 3, SIZE, SIZE), generator=g, dtype=torch.float64) * 2 - 1
    return method, views, indices, [labels[k][indices] for k in KS], uniform


def first_distance(start, method, views, indices, uniform):
    """The mean feature distance of x_org and x_cl at the start (the authors' measure)."""
    net = copy.deepcopy(start)
    clean = [net.project(net.features(v, "normal")) for v in (views[0], views[1], views[3])]
    x_cl, _ = attack(net, views[2], clean, method.targets(indices), None, method.settings, noise=uniform)
    meter = AverageMeter()
    stop_degree(copy.deepcopy(start), views[2], x_cl, 0, meter, script_args("ip"))
    return float(meter.avg)


@pytest.fixture(scope="module", params=["ip", "hn", "iphn"])
def run(request, tmp_path_factory):
    """One step after the 30 measuring epochs (the degree on its ramp: between the mean and d_min)."""
    variant = request.param
    tmp = tmp_path_factory.mktemp(variant)
    method, views, indices, targets, uniform = method_and_inputs(tmp, a_infonce=variant)
    start = advcl_net(KS)
    avg = d_min = None
    if "ip" in variant:  # the running mean a quarter above this step's distance, d_min half below it
        d = first_distance(start, method, views, indices, uniform)
        avg, d_min = 1.25 * d, 0.5 * d
        method, *_ = method_and_inputs(tmp, a_infonce=variant, stpg_d_min=d_min)
        method.distance = torch.tensor([avg * 100, 100.0], dtype=torch.float64)
    method.start_epoch(30)

    ours = copy.deepcopy(start)
    loss, terms = method.loss(ours, views, indices, torch.Generator(), noise=uniform)
    loss.backward()
    net = copy.deepcopy(start)  # the attack alone, for its outputs
    clean = [net.project(net.features(v, "normal")) for v in (views[0], views[1], views[3])]
    x_cl, x_ce = attack(net, views[2], clean, method.targets(indices), None, method.settings, noise=uniform)

    theirs = copy.deepcopy(start)
    meter = AverageMeter()
    meter.update(avg or 0.0, 100)
    args = script_args(variant, d_min=0.4 if d_min is None else d_min)
    ref = reference_step(theirs, views[0], views[1], views[2], targets, uniform, args, epoch=30, meter=meter,
                         num_steps=STEPS)
    ref["loss"].backward()
    return dict(variant=variant, method=method, start=start, ours=ours, theirs=theirs, loss=loss, terms=terms, ref=ref,
                views=views, x_cl=x_cl, x_ce=x_ce)


def test_adversarial_views_equal_the_reference(run):
    ref = run["ref"]
    assert torch.equal(run["x_cl"], ref["x_cl"]) and torch.equal(run["x_ce"], ref["x_ce"])
    assert float((ref["x_cl"] - run["views"][2]).abs().max()) > 3 / 255  # the attack moved


def test_loss_degree_and_gradients_equal_the_reference(run):
    ref, terms = run["ref"], run["terms"]
    assert abs(run["loss"].item() - ref["loss"].item()) < TOL, (run["loss"].item(), ref["loss"].item())
    assert abs(terms["contrast"].item() - ref["contrast"].item()) < TOL
    if "ip" in run["variant"]:  # on the ramp: neither the fixed degree nor 0.5
        assert abs(float(terms["stpg_degree"]) - float(ref["degree"])) < TOL and abs(float(ref["degree"]) - 0.3) < 1e-6
    grads = 0
    for (name, p), q in zip(run["ours"].named_parameters(), run["theirs"].parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=TOL, msg=name)
        grads += int(q.grad.abs().max() > 1e-6)
    assert grads > 20
    # the adversarial BN sets saw the same batches
    ours, theirs = run["ours"].state_dict(), run["theirs"].state_dict()
    for key in ours:
        if "running" in key and (".sets.pgd." in key or ".sets.pgd_ce." in key):
            assert torch.equal(ours[key], theirs[key]), key

