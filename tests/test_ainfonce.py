"""A-InfoNCE (``advcl pretrain --a-infonce ip|hn|iphn``) against an independent copy of the
authors' Asym-AdvCL step (tests/reference/ainfonce_step.py) in float64, on a tiny network whose
BN sets all differ (a view through the wrong set shows), with the scripts' weights; the adaptive
stop-gradient's accumulation and ramp; the resume state; a run through the CLI; the leaderboard
rows and the import its checkpoints reach."""

import copy

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.benchmark.reported import load_reported, reported_id
from advcl_cli.checkpoint import load_checkpoint, load_state
from advcl_cli.config import resolve
from advcl_cli.engine import stop
from advcl_cli.engine.pretrain import make_method, pretrain
from advcl_cli.methods.advcl import attack
from advcl_cli.methods.losses import asym_supcon_loss
from advcl_cli.pseudolabels import save_labels
from advcl_cli.settings import PretrainSettings
from nets import advcl_net
from training import SMALL, pretrain_finetune_eval
from reference.ainfonce_step import AsymSupCon, AverageMeter, reference_step, script_args, stop_degree

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



@pytest.mark.parametrize("hn", [None, (0.1, 1.0), (0.9, 2.0)], ids=["ori", "hn", "hn-clamped"])
@pytest.mark.parametrize("stop_grad", [None, 0.3], ids=["full", "stop-grad"])
def test_the_loss_and_its_gradient_equal_the_authors_criterion(hn, stop_grad):
    """``asym_supcon_loss`` against ``SupConLoss`` / ``ori_SupConLoss`` as coded, on features
    whose views sit close (with tau_plus 0.9 the hard-negative clamp binds: shown below)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 1, 16, generator=g, dtype=torch.float64)
    raw = base + 0.3 * torch.randn(6, 4, 16, generator=g, dtype=torch.float64)
    ours_in, theirs_in = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    tau, beta = hn or (0.1, 1.0)
    args = script_args("iphn", adv_weight=0.7, tau_plus=tau, beta=beta)
    ours = asym_supcon_loss(F.normalize(ours_in, dim=-1), adv_weight=0.7, stop_grad=stop_grad, hard_negatives=hn)
    theirs = AsymSupCon(args, hn=hn is not None)(F.normalize(theirs_in, dim=-1), stop_grad=stop_grad is not None,
                                                 stop_grad_sd=stop_grad)
    assert abs(ours.item() - theirs.item()) < TOL, (ours.item(), theirs.item())
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=TOL)
    if hn is not None:  # the clamp binds for some anchors with tau_plus 0.9 and for none with 0.1
        loose = asym_supcon_loss(F.normalize(raw, dim=-1), adv_weight=0.7, stop_grad=stop_grad, hard_negatives=(tau + 0.05, beta))
        assert (abs(loose.item() - ours.item()) < 1e-12) == (tau == 0.9)


def test_the_measuring_epochs_accumulate_the_distance_then_each_branch_of_the_degree(tmp_path):
    """Epochs 1-30 add each step's mean distance (weighted by the batch) and keep the fixed
    degree; afterwards: the fixed degree above the running mean, 0.5 below d_min."""
    method, views, indices, targets, uniform = method_and_inputs(tmp_path, a_infonce="ip")
    net = advcl_net(KS)
    x_cl = views[2] + uniform[0] * method.eps  # any adversarial view will do
    meter = AverageMeter()
    for epoch, (x_a, x_b) in enumerate(((views[2], x_cl), (views[0], views[1]))):  # two steps of epoch 0 and 1
        method.start_epoch(epoch)
        degree = method.stop_grad_degree(net, x_a, x_b)
        assert degree == 0.2 == stop_degree(net, x_a, x_b, epoch, meter, script_args("ip"))
    assert abs(float(method.distance[0]) - float(meter.sum)) < TOL and float(method.distance[1]) == meter.count == 2 * B
    method.start_epoch(30)
    for avg, d_min, want in ((1e-3, 0.4, 0.2), (1e3, 1e3 - 1, 0.5)):
        method.distance = torch.tensor([avg * 2 * B, 2 * B], dtype=torch.float64)
        method.settings = method.settings.model_copy(update={"stpg_d_min": d_min})
        meter = AverageMeter()
        meter.update(avg, 2 * B)
        theirs = stop_degree(net, views[2], x_cl, 30, meter, script_args("ip", d_min=d_min))
        assert float(method.stop_grad_degree(net, views[2], x_cl)) == float(theirs) == want


TINY = dict(dataset="digits", arch="resnet18-tiny", limit=48, batch_size=16, epochs=2, device="cpu", pgd_steps=1,
            a_infonce="iphn", stpg_adaptive_epochs=1, stpg_d_min=0.0)


def test_a_run_stopped_mid_epoch_resumes_bit_identical_with_the_distance(tmp_path, monkeypatch):
    """Epoch 1 measures the distance, epoch 2 adapts the degree to it: a run stopped in epoch 2
    (after step 5 of 6) and resumed equals the uninterrupted one, bit for bit."""
    from test_preemption import STOP_AT, assert_same_run

    full = pretrain(resolve(PretrainSettings, dict(TINY, out=str(tmp_path / "full")))).run_dir
    state = load_state(full / "state.safetensors")
    distance = state["extra"]["method"]["stpg_distance"]
    assert float(distance[1]) == 48 and float(distance[0]) > 0  # 3 steps of 16 measured
    monkeypatch.setenv(stop.FAULT_ENV, f"{STOP_AT}:USR1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(KeyboardInterrupt):
        pretrain(resolve(PretrainSettings, dict(TINY, out=str(tmp_path / "run"))))
    monkeypatch.delenv(stop.FAULT_ENV)
    pretrain(resolve(PretrainSettings, dict(TINY, out=str(tmp_path / "run"), resume="auto")))
    assert_same_run(tmp_path / "run", full)


def test_a_infonce_runs_offline_through_finetune_and_eval_and_records_its_method(run_cli, tmp_path):
    doc = pretrain_finetune_eval(run_cli, tmp_path, "--a-infonce", "iphn")
    method = load_checkpoint(doc["path"], kind="encoder").meta.method
    assert method == "a-infonce" and doc["metrics"]["stpg_degree"] == pytest.approx(0.2)
    assert load_reported().row_for(reported_id(method), "cifar10").label.startswith("A-InfoNCE")
    code, _, err = run_cli("pretrain", "--a-infonce", "asym", *SMALL)
    assert code == 2 and "a-infonce" in err and "Traceback" not in err
