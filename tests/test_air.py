"""ACL-AIR: its SIR and AIR terms against the formula written out by hand, one step against an
independent float64 reference of the authors' step (tests/reference/air_step.py), two processes
against one, and the command line end to end.

Run as a script (``python tests/test_air.py DIR``, alone or under torchrun) it is the worker of
``test_two_processes_match_one``."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from advcl_cli.settings.layering import resolve
from advcl_cli.data.augment import ViewSpec
from advcl_cli.distributed import DistContext
from advcl_cli.engine.finetune import PROTOCOL, protocol
from advcl_cli.engine.pretrain import make_method
from advcl_cli.methods import get_method, method_for
from advcl_cli.attacks.pgd import uniform_noise
from advcl_cli.methods.acl import ACL
from advcl_cli.methods.air import AIR
from advcl_cli.methods.losses import adversarial_invariance, standard_invariance
from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD, create_model
from advcl_cli.settings import PretrainSettings
from nets import randomise_batch_norms
from reference.air_step import reference_step

B, SIZE = 8, 16
EPS = 8 / 255
TOL = 1e-10


def air_method(**overrides):
    return make_method(resolve(PretrainSettings, {"method": "air", "arch": "resnet18-tiny", **overrides}), B)


def air_net(seed=0, dtype=torch.float64):
    """resnet18-tiny as ACL builds it (BN sets normal/pgd, the three-layer head with a BN per set,
    ImageNet normalisation inside), every BN set randomised so that a view sent through the wrong
    one shows."""
    torch.manual_seed(seed)
    model = create_model("resnet18-tiny", **air_method().model_config("resnet18-tiny"))
    return randomise_batch_norms(model, seed + 1).to(dtype).train()


def as_model(net):
    """The authors' ``model(x, bn_name)``: images to the projection head's output."""
    return lambda x, bn: net.project(net.features(x, bn), bn)


def images(seed=0):
    return torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- the two regularisers against their formula ---------------------------------------------


def softmax_by_hand(d):
    e = [math.exp(v) for v in d]
    return [v / sum(e) for v in e]


def d_by_hand(a, b, tau=0.5):
    """d_k = cos(a_k, b_k) / tau, row by row."""
    return [float(a[k] @ b[k]) / (float(a[k].norm()) * float(b[k].norm())) / tau for k in range(len(a))]


def kl_div_sum_by_hand(inp, log_target):
    """torch's kl_div(input, target, log_target=True, reduction="sum"): sum_k exp(t_k) (t_k - x_k)."""
    return sum(math.exp(t) * (t - x) for x, t in zip(inp, log_target))


@pytest.fixture
def projections():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(B, 6, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5, 1.5, 3.0)]


def test_sir_is_the_coded_kl_div_with_probabilities_as_its_input(projections):
    z_i, z_j, z_o = projections[:3]
    p = softmax_by_hand(d_by_hand(z_i, z_o))  # over the batch index k
    log_q = [math.log(v) for v in softmax_by_hand(d_by_hand(z_j, z_o))]
    expected = kl_div_sum_by_hand(p, log_q)  # p, not log p, as the authors' code passes it
    ours = standard_invariance(z_i, z_j, z_o, 0.5)
    assert abs(float(ours) - expected) < 1e-12
    # not the textbook KL(q || p): the detail changes the value (and its gradient)
    textbook = sum(math.exp(t) * (t - math.log(x)) for x, t in zip(p, log_q))
    assert abs(expected - textbook) > 1.0
    # the temperature is the d's: doubling it halves every logit
    assert abs(float(standard_invariance(z_i, z_j, z_o, 1.0)) - kl_div_sum_by_hand(
        softmax_by_hand(d_by_hand(z_i, z_o, 1.0)), [math.log(v) for v in softmax_by_hand(d_by_hand(z_j, z_o, 1.0))])) < 1e-12


def test_air_is_the_coded_kl_div_of_unnormalised_products(projections):
    z_i, z_j, z_o, za_i, za_j = projections
    p_i = [a * b for a, b in zip(softmax_by_hand(d_by_hand(za_i, z_o)), softmax_by_hand(d_by_hand(za_i, z_i)))]
    p_j = [a * b for a, b in zip(softmax_by_hand(d_by_hand(za_j, z_o)), softmax_by_hand(d_by_hand(za_j, z_j)))]
    assert sum(p_i) < 0.5 and sum(p_j) < 0.5  # products of two distributions, not renormalised
    expected = kl_div_sum_by_hand(p_i, [math.log(v) for v in p_j])
    ours = adversarial_invariance(z_i, z_j, z_o, za_i, za_j, 0.5)
    assert abs(float(ours) - expected) < 1e-12


def test_the_terms_see_the_whole_batch_and_pass_gradients_to_every_projection(projections):
    z = [t.clone().requires_grad_(True) for t in projections]
    total = standard_invariance(*z[:3]) + adversarial_invariance(*z)
    grads = torch.autograd.grad(total, z)
    assert all(float(g.abs().max()) > 1e-6 for g in grads)  # z_o and the kl_div target included
    # the softmaxes couple the images: a batch's terms are not the sum of its halves' (hence the
    # gather under torchrun)
    halves = [[t[:B // 2] for t in projections], [t[B // 2:] for t in projections]]
    for term, n in ((standard_invariance, 3), (adversarial_invariance, 5)):
        whole = float(term(*projections[:n]))
        assert abs(whole - sum(float(term(*h[:n])) for h in halves)) > 0.1


# --- one step against the reference, float64 ------------------------------------------------


def sgd_step(model, loss):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def run():
    method = air_method()
    batch = images()
    x1, x2, x_o = method.views(batch, torch.Generator().manual_seed(1), torch.float64)
    noise = torch.rand((2, B, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    start = air_net()

    ours = copy.deepcopy(start)
    loss, terms = method.loss(ours, (x1, x2, x_o), noise)
    sgd_step(ours, loss)

    theirs = copy.deepcopy(start)
    ref = reference_step(as_model(theirs), theirs, x1, x2, x_o, EPS * noise[0], EPS * noise[1])
    sgd_step(theirs, ref["loss"])

    net = copy.deepcopy(start)
    a1, a2 = method.attack(net, x1, x2, noise, DistContext())
    return dict(batch=batch, views=(x1, x2, x_o), start=start, ours=ours, theirs=theirs, loss=loss, terms=terms,
                ref=ref, adv=(a1, a2))


def test_the_unaugmented_view_is_the_image(run):
    x1, x2, x_o = run["views"]
    assert torch.equal(x_o, run["batch"].double() / 255)
    assert not torch.equal(x1, x_o) and not torch.equal(x1, x2)


def test_adversarial_views_equal_the_reference(run):
    x1, x2, _ = run["views"]
    for ours, theirs, x in zip(run["adv"], (run["ref"]["a1"], run["ref"]["a2"]), (x1, x2)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
        assert float((ours - x).abs().max()) > 4 / 255  # the attack moved


def test_losses_equal_the_reference(run):
    ref, terms = run["ref"], run["terms"]
    assert run["loss"].dtype == torch.float64 and set(terms) == {"clean", "adv", "sir", "air"}
    for key in ("clean", "adv", "sir", "air"):
        assert abs(float(terms[key]) - float(ref[key].detach())) < TOL, key
    assert abs(float(run["loss"].detach()) - float(ref["loss"].detach())) < TOL
    # not vacuous: both regularisers weigh in the total
    assert min(abs(float(terms["sir"])), abs(float(terms["air"]))) > 1e-3


def test_weights_and_statistics_after_one_step_equal_the_reference(run):
    start, ours, theirs = run["start"].state_dict(), run["ours"].state_dict(), run["theirs"].state_dict()
    assert ours.keys() == theirs.keys()
    params = [name for name, _ in run["ours"].named_parameters()]
    assert max(float((ours[k] - start[k]).abs().max()) for k in params) > 1e-3
    for key in ours:  # parameters and every BN set's running statistics (x_o's batch included)
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=TOL, msg=key)
    count = lambda key: int(ours[key]) - int(start[key])  # noqa: E731
    # "normal": the clean pair, then x_o in a batch of its own; "pgd": the attacked pair (eval in PGD)
    assert count("backbone.bn1.sets.normal.num_batches_tracked") == 2
    assert count("backbone.bn1.sets.pgd.num_batches_tracked") == 1


def test_the_step_feeds_the_views_and_the_image(run):
    """``step`` (what the engine calls), in float64: the views drawn from the generator, the
    random start after them, and x_o the image itself."""
    method, batch = air_method(), run["batch"]
    model = copy.deepcopy(run["start"])
    loss, terms = method.step(model, batch, torch.arange(B), torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x1, x2, _ = method.views(batch, g, torch.float64)
    noise = uniform_noise(x1, g, count=2)
    theirs = copy.deepcopy(run["start"])
    ref = reference_step(as_model(theirs), theirs, x1, x2, batch.double() / 255, EPS * noise[0], EPS * noise[1])
    assert abs(float(loss.detach()) - float(ref["loss"].detach())) < TOL
    assert abs(float(terms["air"]) - float(ref["air"].detach())) < TOL


def test_a_weight_other_than_zero_reaches_the_two_contrastive_terms(run):
    """The hook DynACL-AIR sets: (1 - w) clean + (1 + w) adversarial, the regularisers unchanged."""
    method = air_method(sir_weight=0.25, air_weight=2.0)
    method.adversarial_weight = lambda: 0.4
    x1, x2, x_o = run["views"]
    noise = torch.rand((2, B, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    loss, terms = method.loss(copy.deepcopy(run["start"]), (x1, x2, x_o), noise)
    theirs = copy.deepcopy(run["start"])
    ref = reference_step(as_model(theirs), theirs, x1, x2, x_o, EPS * noise[0], EPS * noise[1], weight=0.4,
                         lambda1=0.25, lambda2=2.0)
    assert abs(float(loss.detach()) - float(ref["loss"].detach())) < TOL
    assert abs(float(loss.detach()) - (0.6 * terms["clean"] + 1.4 * terms["adv"] + 0.25 * terms["sir"] + 2 * terms["air"])) < TOL


# --- settings, registration, finetuning protocol --------------------------------------------


def test_defaults_are_the_authors():
    s = resolve(PretrainSettings, {"method": "air"})
    assert (s.sir_weight, s.air_weight, s.temperature) == (0.5, 0.5, 0.5)
    assert (s.optimizer, s.lr, s.weight_decay, s.momentum, s.lars_eta, s.batch_size, s.epochs) == ("lars", 5.0, 1e-6, 0.9, 1e-3, 512, 1000)
    assert (s.eps, s.pgd_steps, s.pgd_step_size) == (pytest.approx(8 / 255), 5, pytest.approx(2 / 255))
    method = air_method()
    assert get_method("air") is AIR and issubclass(AIR, ACL)
    assert method.checkpoint_name == "acl-air" and method.adversarial_weight() == 0.0
    assert method.schedule() == ACL(method.settings, n_images=B).schedule()
    # the authors' transform at strength 1: crop scale (1 - 0.9, 1), bicubic, jitter 0.4/0.1 p 0.8, gray 0.2
    assert method.view_spec() == ViewSpec.acl() == ViewSpec(scale=(0.1, 1.0), interpolation="bicubic")
    assert method.model_config("resnet18-tiny") == {"bn_sets": ("normal", "pgd"), "proj_dim": 64, "proj_head": "mlp3",
                                                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def test_acl_air_encoders_finetune_as_acl_but_for_the_benchmarks_own_rates():
    """ACL's protocol, but for the cells the benchmark sets otherwise for ACL-AIR (every cell is
    pinned in test_protocol.py): SLF on CIFAR-10 at lr 0.005, SLF/ALF on CIFAR-100 at 0.1."""
    assert method_for("acl-air") is AIR
    own = {("slf", "cifar10"): 0.005, ("slf", "cifar100"): 0.1, ("alf", "cifar100"): 0.1}
    for scheme in PROTOCOL:
        for dataset in ("cifar10", "cifar100"):
            expected = {**protocol("acl", scheme, dataset)}
            if (scheme, dataset) in own:
                expected["lr"] = own[scheme, dataset]
            assert protocol("acl-air", scheme, dataset) == expected, (scheme, dataset)
    assert protocol("acl-air", "aff", "cifar10") != protocol("no-such-method", "aff", "cifar10")


# --- through the command line, and on two processes -----------------------------------------


def test_pretrain_finetune_and_eval_on_digits(run_cli, tmp_path):
    common = ["--limit", "64", "--device", "cpu"]
    code, enc, err = run_cli("pretrain", "--method", "air", "-d", "digits", "--arch", "resnet18-tiny", "--epochs", "1",
                             "--batch-size", "32", "--image-size", str(SIZE), "--pgd-steps", "2", *common,
                             "--out", tmp_path / "air")
    assert code == 0, err
    enc = enc.strip()
    with safe_open(enc, "pt") as f:
        meta = json.loads(f.metadata()["advcl"])
    assert meta["method"] == "acl-air" and meta["eps"] == pytest.approx(EPS)
    assert meta["config"]["sir_weight"] == 0.5 and meta["config"]["air_weight"] == 0.5
    assert meta["model"]["bn_sets"] == ["normal", "pgd"] and meta["model"]["proj_head"] == "mlp3"
    assert all(math.isfinite(meta["metrics"][k]) for k in ("loss", "clean", "adv", "sir", "air"))
    code, clf, err = run_cli("finetune", enc, "--scheme", "slf", "--epochs", "1", "--batch-size", "32",
                             "--eval-limit", "8", *common, "--out", tmp_path / "slf")
    assert code == 0, err
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd5", "--limit", "16", "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 16 and 0 <= doc["robust"][0]["robust_acc"] <= doc["clean_acc"] <= 1


def worker(folder: str) -> None:
    """One float64 AIR step on a fixed global batch (``python tests/test_air.py DIR``, as one
    process or under torchrun); rank 0 saves gradients, terms and BN statistics."""
    from test_distributed import save_step

    save_step(f"{folder}/air.safetensors", air_method(pgd_steps=3), air_net(), images(5))


def test_two_processes_match_one(tmp_path):
    """Under torchrun the NT-Xent terms and the softmaxes of SIR and AIR run over the gathered
    global batch and BN normalises over it: 2 processes x B/2 give one process's gradients."""
    from test_distributed import assert_same_step, one_and_two_processes

    one, two = one_and_two_processes(tmp_path, __file__, "air.safetensors")
    assert float(one["term.sir"]) != 0 and float(one["term.air"]) != 0
    assert_same_step(one, two)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(sys.argv[1])


# --- DynACL-AIR ------------------------------------------------------------------------------


def test_dynacl_air_is_air_with_dynacls_strength_schedule(run):
    """The authors' --DynAug: strength s = 1 - 50 floor(e / 50) / epochs (0-based e), views at s
    with bicubic crops, w = (2/3)(1 - s) on the two contrastive terms; no momentum encoder,
    ACL's per-step cosine; checkpoints named dynacl-air, finetuned as DynACL's."""
    from advcl_cli.engine.pretrain import make_method
    from advcl_cli.methods.air import DynACLAIR

    method = make_method(resolve(PretrainSettings, {"method": "dynacl-air", "arch": "resnet18-tiny"}), B)
    assert isinstance(method, DynACLAIR) and method.checkpoint_name == "dynacl-air"
    expected = {0: 1.0, 49: 1.0, 50: 0.95, 51: 0.95, 999: 0.05}  # epochs 1, 50, 51, 52, 1000 counted from 1
    for epoch, s in expected.items():
        method.start_epoch(epoch)
        assert method.strength() == pytest.approx(s)
        assert method.adversarial_weight() == pytest.approx((2 / 3) * (1 - s))
        spec = method.view_spec()
        assert spec.interpolation == "bicubic" and spec.flip_p == 0.5
        assert spec.scale == pytest.approx((1 - 0.9 * s, 1.0))
        assert spec.jitter == pytest.approx((0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s))
        assert (spec.jitter_p, spec.gray_p) == pytest.approx((0.8 * s, 0.2 * s))
    assert method.schedule() == ACL(method.settings, n_images=B).schedule()  # per step, as ACL's
    assert not hasattr(method, "momentum_net")
    assert protocol("dynacl-air", "aff", "cifar10") == protocol("dynacl", "aff", "cifar10")
    assert protocol("dynacl-air", "aff", "cifar10") != protocol("acl", "aff", "cifar10")

    method.start_epoch(500)  # s = 0.5, w = 1/3: the step against the reference at that weight
    x1, x2, x_o = run["views"]
    noise = torch.rand((2, B, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    loss, _ = method.loss(copy.deepcopy(run["start"]), (x1, x2, x_o), noise)
    theirs = copy.deepcopy(run["start"])
    ref = reference_step(as_model(theirs), theirs, x1, x2, x_o, EPS * noise[0], EPS * noise[1], weight=1 / 3)
    assert abs(float(loss.detach()) - float(ref["loss"].detach())) < TOL
