"""RoCL against an independent copy of the authors' step (tests/reference/rocl_step.py) in
float64, on a tiny network whose BN running statistics differ from any batch's (so an attack in
train mode, or a view sent through another pass, shows); its loss written out, its defaults and
schedule, and a run through the CLI."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from advcl_cli.config import resolve
from advcl_cli.engine.pretrain import make_method
from advcl_cli.methods.losses import rocl_nt_xent
from advcl_cli.models import create_model
from advcl_cli.settings import PretrainSettings
from nets import randomise_batch_norms
from reference.rocl_step import reference_step
from training import pretrain_finetune_eval

B, SIZE = 6, 32
TOL = 1e-10


def rocl(**flags):
    return make_method(resolve(PretrainSettings, {"method": "rocl", "arch": "resnet18-tiny", **flags}), B)


def rocl_net(method):
    """resnet18-tiny as RoCL builds it, its BN statistics randomised, float64, train mode."""
    torch.manual_seed(0)
    return randomise_batch_norms(create_model("resnet18-tiny", **method.model_config("resnet18-tiny")), 1).double().train()


def images(seed: int):
    return torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run():
    method = rocl(reg_lambda=4.0)  # a weight that matters at this scale (1/256 would hide a mix-up below TOL)
    x1, x2, noise = method.views(images(0), torch.Generator().manual_seed(1), torch.float64)
    start = rocl_net(method)

    ours = copy.deepcopy(start)
    loss, terms = method.loss(ours, x1, x2, noise)
    loss.backward()
    theirs = copy.deepcopy(start)
    s = method.settings
    ref = reference_step(theirs, x1, x2, noise, eps=s.eps, alpha=s.pgd_step_size, k=s.pgd_steps, lamda=s.reg_lambda)
    ref["loss"].backward()
    return dict(method=method, views=(x1, x2, noise), start=start, ours=ours, theirs=theirs, loss=loss, terms=terms, ref=ref)


def test_the_adversarial_view_equals_the_reference(run):
    x1, x2, noise = run["views"]
    s = run["method"].settings
    x_adv = run["method"].attack(copy.deepcopy(run["start"]), x1, x2, noise)
    torch.testing.assert_close(x_adv, run["ref"]["x_adv"], rtol=0, atol=1e-12)
    assert float((x_adv - x1).abs().max()) <= s.eps + 1e-12 and float((x_adv - x1).abs().max()) > s.eps / 2  # it moved


def test_loss_terms_gradients_and_bn_statistics_equal_the_reference(run):
    ref = run["ref"]
    assert abs(float(run["loss"].detach()) - float(ref["loss"].detach())) < TOL
    assert abs(float(run["terms"]["nt_xent"]) - float(ref["nt_xent"])) < TOL
    assert abs(float(run["terms"]["reg"]) - float(ref["reg"])) < TOL
    ours, theirs = dict(run["ours"].named_parameters()), dict(run["theirs"].named_parameters())
    for name, p in ours.items():
        assert p.grad is not None and float((p.grad - theirs[name].grad).abs().max()) < TOL, name
    state, ref_state = run["ours"].state_dict(), run["theirs"].state_dict()
    for key, value in state.items():
        assert torch.equal(value, ref_state[key]) or float((value - ref_state[key]).abs().max()) < TOL, key
    # two train-mode passes (the regulariser's, the loss's) moved the statistics; the attack none
    assert int(state["backbone.bn1.sets.normal.num_batches_tracked"]) == 2


def test_the_loss_written_out_anchor_by_anchor(run):
    """RoCL's NT-Xent by hand on the three views' projections: each anchor's two positives, each
    -log(e_ij / (sum_k e_ik + 1e-8) + 1e-8), summed and divided by the 3B anchors."""
    net = copy.deepcopy(run["start"])
    x1, x2, _ = run["views"]
    x_adv = run["ref"]["x_adv"]
    with torch.no_grad():
        z = net.project(net.features(torch.cat([x1, x2, x_adv])))
        n = z.shape[0]
        zn = z / (z.norm(dim=1, keepdim=True) + 1e-8)
        total = 0.0
        for i in range(n):
            e = [math.exp(float(zn[i] @ zn[j]) / 0.5) if j != i else 0.0 for j in range(n)]
            for j in range(n):
                if j != i and j % B == i % B:
                    total -= math.log(e[j] / (sum(e) + 1e-8) + 1e-8)
        assert abs(float(rocl_nt_xent(z, 3)) - total / n) < 1e-9


def test_defaults_schedule_and_model_are_the_authors():
    method = rocl()
    s = method.settings
    assert (s.optimizer, s.lr, s.momentum, s.weight_decay, s.lars_eta) == ("lars", 0.1, 0.9, 1e-6, 1e-3)
    assert (s.epochs, s.batch_size, s.temperature, s.reg_lambda, s.warmup_multiplier) == (1000, 512, 0.5, 256.0, 15.0)
    assert (s.eps, s.pgd_steps, s.pgd_step_size) == (0.0314, 7, 0.007)
    sched = method.schedule()
    assert sched.lr(0) == pytest.approx(0.1 * (1 + 14 * 1 / 10))  # the scheduler steps before epoch 0
    assert sched.lr(9) == pytest.approx(1.5) and sched.lr(9, 5, 98) == sched.lr(9)  # per epoch
    assert sched.lr(10) == pytest.approx(1.5 * (1 + math.cos(math.pi / 1000)) / 2)
    assert sched.lr(999) == pytest.approx(1.5 * (1 + math.cos(math.pi * 990 / 1000)) / 2)
    assert method.model_config("resnet18") == {"bn_sets": ("normal",), "proj_dim": 128, "proj_head": "mlp2-wide"}
    head = create_model("resnet18", **method.model_config("resnet18")).proj.net
    assert [tuple(m.weight.shape) for m in head if isinstance(m, torch.nn.Linear)] == [(2048, 512), (128, 2048)]


def test_rocl_runs_offline_through_finetune_and_eval(run_cli, tmp_path):
    doc = pretrain_finetune_eval(run_cli, tmp_path, "--method", "rocl")
    assert doc["metrics"]["reg"] > 0 and doc["metrics"]["nt_xent"] > 0


def worker(folder: str) -> None:
    """One float64 RoCL step on a fixed global batch (``python tests/test_rocl.py DIR``, as one
    process or under torchrun); rank 0 saves gradients, terms and BN statistics."""
    from test_distributed import save_step

    method = rocl(pgd_steps=2, reg_lambda=4.0)
    save_step(f"{folder}/rocl.safetensors", method, rocl_net(method), images(5))


def test_two_processes_match_one(tmp_path):
    """Under torchrun the attack's, the regulariser's and the loss's NT-Xent see the gathered
    global batch and BN normalises over it: 2 processes x B/2 give one process's gradients."""
    from test_distributed import assert_same_step, one_and_two_processes

    one, two = one_and_two_processes(tmp_path, __file__, "rocl.safetensors")
    assert float(one["term.reg"]) > 0
    assert_same_step(one, two)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(sys.argv[1])
