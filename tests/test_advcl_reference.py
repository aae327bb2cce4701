"""advcl's AdvCL step against an independent copy of the authors' step (tests/reference), in
float64, on a tiny network whose BN sets all have different weights and statistics (so a view
sent through the wrong set shows), with the same views, random starts and pseudo labels."""

import copy

import pytest
import torch

from advcl_cli.settings.layering import resolve
from advcl_cli.engine.pretrain import make_method
from advcl_cli.methods.advcl import attack, attack_objective
from advcl_cli.pseudolabels import save_labels
from advcl_cli.settings import PretrainSettings
from nets import advcl_net
from reference.advcl_step import ReferenceAttack, high_frequency, reference_step

B, N, KS, SIZE = 8, 16, (2, 5, 10), 32
SGD = dict(lr=0.5, momentum=0.9, weight_decay=1e-4)
TOL = 1e-10


def sgd_step(model, loss):
    opt = torch.optim.SGD(model.parameters(), **SGD)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    labels = {k: torch.randint(0, k, (N,), generator=g) for k in KS}
    path = save_labels(tmp_path_factory.mktemp("pl") / "pl.safetensors", labels, dataset="t", split="train", encoder="x")
    method = make_method(resolve(PretrainSettings, {"arch": "resnet18-tiny", "pseudo_labels": path}), N)
    images = torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    indices = torch.randperm(N, generator=g)[:B]
    views = method.views(images, torch.Generator().manual_seed(1), torch.float64)
    uniform = torch.rand((2, B, 3, SIZE, SIZE), generator=g, dtype=torch.float64) * 2 - 1
    targets = [labels[k][indices] for k in KS]
    x1, x2, x_org, _ = views
    start = advcl_net(KS)

    ours = copy.deepcopy(start)
    loss, terms = method.loss(ours, views, indices, torch.Generator(), noise=uniform)
    sgd_step(ours, loss)

    theirs = copy.deepcopy(start)
    ref = reference_step(theirs, x1, x2, x_org, targets, uniform)
    sgd_step(theirs, ref["loss"])

    net = copy.deepcopy(start)  # the attack alone, for its outputs
    clean = [net.project(net.features(v, "normal")) for v in (x1, x2, views[3])]
    x_cl, x_ce = attack(net, x_org, clean, method.targets(indices), None, method.settings, noise=uniform)
    return dict(method=method, views=views, uniform=uniform, targets=targets, indices=indices, start=start,
                ours=ours, theirs=theirs, loss=loss, terms=terms, ref=ref, x_cl=x_cl, x_ce=x_ce)


def test_adversarial_views_and_hfc_equal_the_reference(run):
    ref = run["ref"]
    assert torch.equal(run["x_cl"], ref["x_cl"])
    assert torch.equal(run["x_ce"], ref["x_ce"])
    torch.testing.assert_close(run["views"][3], ref["x_hfc"], rtol=0, atol=1e-12)
    x_org = run["views"][2]
    for x in (run["x_cl"], run["x_ce"]):  # not vacuous: the attack moved, and the two differ
        assert float((x - x_org).abs().max()) > 4 / 255
    assert not torch.equal(run["x_cl"], run["x_ce"])


def test_losses_equal_the_reference(run):
    ref, terms = run["ref"], run["terms"]
    assert run["loss"].dtype == torch.float64
    for ours, theirs in ((run["loss"], ref["loss"]), (terms["contrast"], ref["contrast"]), (terms["pseudo_ce"], ref["pseudo_ce"])):
        assert abs(ours.item() - theirs.item()) < TOL, (ours.item(), theirs.item())


def test_weights_after_one_sgd_step_equal_the_reference(run):
    start, ours, theirs = run["start"].state_dict(), run["ours"].state_dict(), run["theirs"].state_dict()
    moved = max(float((ours[k] - start[k]).abs().max()) for k, _ in run["ours"].named_parameters())
    assert moved > 1e-3
    for name, _ in run["ours"].named_parameters():
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=TOL, msg=name)
    # the adversarial BN sets saw the same batches in the same order; the "normal" set and the
    # projection head's BN saw fewer updates in advcl (the clean views run once per step)
    stats = [k for k in ours if "running" in k or "num_batches" in k]
    for key in stats:
        if ".sets.pgd." in key or ".sets.pgd_ce." in key:
            assert torch.equal(ours[key], theirs[key]), key
    # batches per step (README): pgd 5 + 1; normal 3 here, 3 x (5 + 1) there; the projection
    # head's BN 3 + 5 + 1 here, 5 x 5 + 5 there
    count = lambda state, key: int(state[key]) - int(start[key])  # noqa: E731
    assert count(ours, "backbone.bn1.sets.pgd.num_batches_tracked") == count(theirs, "backbone.bn1.sets.pgd.num_batches_tracked") == 6
    assert (count(ours, "backbone.bn1.sets.normal.num_batches_tracked"), count(theirs, "backbone.bn1.sets.normal.num_batches_tracked")) == (3, 18)
    assert (count(ours, "proj.net.1.num_batches_tracked"), count(theirs, "proj.net.1.num_batches_tracked")) == (9, 30)


def test_attack_objective_equals_the_reference(run):
    """The loss PGD ascends (weights, reductions, scales), at the random start."""
    method, uniform, targets = run["method"], run["uniform"], run["targets"]
    x1, x2, x_org, x_hfc = run["views"]
    x_cl, x_ce = x_org + uniform[0] * method.eps, x_org + uniform[1] * method.eps
    net = copy.deepcopy(run["start"])
    clean = [net.project(net.features(v, "normal")) for v in (x1, x2, x_hfc)]
    ours = attack_objective(net, x_cl, x_ce, clean, method.targets(run["indices"]), method.settings)
    theirs = ReferenceAttack(copy.deepcopy(run["start"])).objective(x1, x2, high_frequency(x_org, 8), x_cl, x_ce, targets)
    assert abs(ours.item() - theirs.item()) < TOL, (ours.item(), theirs.item())
