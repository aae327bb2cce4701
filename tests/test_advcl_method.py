"""AdvCL pinned to the reference: views, attack, loss, and the clean-once speed-up."""

import copy
import math

import pytest
import torch

from advcl_cli.config import resolve
from advcl_cli.engine.pretrain import make_method
from advcl_cli.errors import UsageError
from advcl_cli.methods import get_method
from advcl_cli.methods.advcl import AdvCL
from advcl_cli.methods.simclr import SimCLR
from advcl_cli.methods.advcl import AttackConfig, attack
from advcl_cli.methods.losses import pseudo_label_ce, supcon_loss
from advcl_cli.models import create_model
from advcl_cli.pseudolabels import save_labels
from advcl_cli.settings import PretrainSettings

B = 8
KS = (2, 5)
EPS = 8 / 255


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.fixture
def labels_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    labels = {k: torch.randint(0, k, (B,), generator=g) for k in KS}
    return save_labels(tmp_path / "pl.safetensors", labels, dataset="test", split="train", encoder="x")


def make(labels_file=None, **overrides):
    settings = resolve(PretrainSettings, dict(arch="resnet18-tiny", pseudo_labels=labels_file, **overrides))
    method = make_method(settings, B)
    torch.manual_seed(0)
    model = create_model("resnet18-tiny", **method.model_config("resnet18-tiny")).train()
    return method, model


def gen(seed=5):
    return torch.Generator().manual_seed(seed)


def supcon_by_hand(views, temperature=0.5, base_temperature=0.07):
    """[z_cl, z1, z2, z_hfc], each (B, D): the SupCon formula, anchor by anchor."""
    vectors = [(i, z[i]) for z in views for i in range(z.shape[0])]
    total = 0.0
    for p, (img, zp) in enumerate(vectors):
        logits = [float(zp @ za) / temperature for a, (_, za) in enumerate(vectors) if a != p]
        log_denom = math.log(sum(math.exp(v) for v in logits))
        pos = [float(zp @ za) / temperature - log_denom for a, (j, za) in enumerate(vectors) if a != p and j == img]
        total -= (temperature / base_temperature) * sum(pos) / len(pos)
    return total / len(vectors)


def test_registry_and_model_configs(labels_file):
    assert get_method("advcl") is AdvCL and get_method("simclr") is SimCLR
    with pytest.raises(UsageError, match="simclr"):
        get_method("byol")
    with_labels, _ = make(labels_file)
    assert with_labels.model_config("resnet18") == {"bn_sets": ("normal", "pgd", "pgd_ce"), "proj_dim": 128, "pseudo_ks": KS}
    without, _ = make()
    assert without.model_config("resnet18")["pseudo_ks"] == () and "pseudo-label term" in without.notes[0]
    defaults = resolve(PretrainSettings, {})
    assert defaults.eps == pytest.approx(8 / 255) and defaults.pgd_steps == 5


def test_contrastive_loss_equals_the_supcon_formula(batch, labels_file):
    method, model = make(labels_file)
    loss, terms = method.step(model, batch, torch.arange(B), gen())
    # redo the step's pieces with the same random draws and compute the formula by hand
    g = gen()
    x1, x2, x_org, x_hfc = method.views(batch, g)
    clean = [model.project(model.features(v, "normal")) for v in (x1, x2, x_hfc)]
    targets = method.targets(torch.arange(B))
    x_cl, x_ce = attack(model, x_org, clean, targets, g, method.cfg)
    z_cl = model.project(model.features(x_cl, "pgd"))
    expected = supcon_by_hand([z.double().detach() for z in (z_cl, *clean)])
    assert float(terms["contrast"]) == pytest.approx(expected, rel=1e-4)
    ce = pseudo_label_ce(model.pseudo_logits(model.features(x_ce, "pgd_ce")), targets)
    assert float(terms["pseudo_ce"]) == pytest.approx(float(ce.detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(expected + 0.2 * float(ce.detach()), rel=1e-4)


def test_views_follow_the_reference(batch):
    method, _ = make()
    x1, x2, x_org, x_hfc = method.views(batch, gen())
    assert all(v.shape == (B, 3, 32, 32) and v.dtype == torch.float32 for v in (x1, x2, x_org, x_hfc))
    assert 0 <= float(x1.min()) and float(x1.max()) <= 1 and not torch.equal(x1, x2)
    # x_org is a crop of the image padded with zeros: its values are pixels of the image or 0
    pixels = set((batch.float() / 255).unique().tolist()) | {0.0}
    assert set(x_org.unique().tolist()) <= pixels
    # x_HFC is x_org without its low frequencies: it sums to ~0 (the DC term is removed)
    assert x_hfc.sum(dim=(2, 3)).abs().max() < 1e-3


def _attack_losses(model, method, x_cl, x_ce, x_org, clean, targets):
    def contrast(x):
        return float(supcon_loss(torch.stack([model.project(model.features(x, "pgd")), *clean], 1)))

    def ce(x):
        return float(pseudo_label_ce(model.pseudo_logits(model.features(x, "pgd_ce")), targets))

    return contrast(x_cl), contrast(x_org), ce(x_ce), ce(x_org)


def test_adversarial_examples_stay_in_the_ball_and_raise_their_own_loss(batch, labels_file):
    method, model = make(labels_file)
    g = gen()
    x1, x2, x_org, x_hfc = method.views(batch, g)
    with torch.no_grad():
        clean = [model.project(model.features(v, "normal")) for v in (x1, x2, x_hfc)]
    targets = method.targets(torch.arange(B))
    x_cl, x_ce = attack(model, x_org, clean, targets, g, method.cfg)
    for x in (x_cl, x_ce):
        assert float((x - x_org).abs().max()) <= EPS + 1e-6
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        assert float((x - x_org).abs().max()) > EPS / 2  # it moved
    with torch.no_grad():
        adv_cl, clean_cl, adv_ce, clean_ce = _attack_losses(model, method, x_cl, x_ce, x_org, clean, targets)
    assert adv_cl > clean_cl
    assert adv_ce > clean_ce


def test_each_adversarial_view_ignores_the_other_term(batch, labels_file):
    method, model = make(labels_file)
    g = gen()
    _, _, x_org, _ = method.views(batch, g)
    state = g.get_state()
    rng = torch.Generator().manual_seed(9)
    clean_a = [torch.nn.functional.normalize(torch.randn(B, 128, generator=rng), dim=1) for _ in range(3)]
    clean_b = [torch.nn.functional.normalize(torch.randn(B, 128, generator=rng), dim=1) for _ in range(3)]
    targets_a = method.targets(torch.arange(B))
    targets_b = [(t + 1) % k for t, k in zip(targets_a, KS)]

    def run(clean, targets, cfg=method.cfg):
        g.set_state(state)
        return attack(model, x_org, clean, targets, g, cfg)

    base_cl, base_ce = run(clean_a, targets_a)
    other_labels_cl, other_labels_ce = run(clean_a, targets_b)
    assert torch.equal(base_cl, other_labels_cl)  # x_cl does not see the pseudo-label term
    assert not torch.equal(base_ce, other_labels_ce)
    no_ce_cl, _ = run(clean_a, targets_a, AttackConfig(ce_weight=0.0))
    assert torch.equal(base_cl, no_ce_cl)
    other_clean_cl, other_clean_ce = run(clean_b, targets_a)
    assert torch.equal(base_ce, other_clean_ce)  # x_ce does not see the contrastive term
    assert not torch.equal(base_cl, other_clean_cl)

    # and directly: the joint attack loss's gradient w.r.t. x_cl is that of the contrastive term
    x_cl = x_org.clone().requires_grad_(True)
    x_ce = x_org.clone().requires_grad_(True)
    contrast = supcon_loss(torch.stack([model.project(model.features(x_cl, "pgd")), *clean_a], 1))
    ce = pseudo_label_ce(model.pseudo_logits(model.features(x_ce, "pgd_ce")), targets_a, reduction="sum")
    g_cl, g_ce = torch.autograd.grad(contrast + 0.2 * ce, [x_cl, x_ce], retain_graph=True)
    assert torch.equal(g_cl, torch.autograd.grad(contrast, x_cl, retain_graph=True)[0])
    torch.testing.assert_close(g_ce, 0.2 * torch.autograd.grad(ce, x_ce)[0], rtol=1e-4, atol=1e-5 * float(g_ce.abs().max()))


def test_attack_without_steps_is_the_random_start(batch):
    method, model = make(pgd_steps=0)
    _, _, x_org, _ = method.views(batch, gen())
    x_cl, x_ce = attack(model, x_org, [torch.zeros(B, 128)] * 3, None, gen(1), method.cfg)
    assert x_ce is None
    delta = x_cl - x_org
    assert float(delta.abs().max()) <= EPS + 1e-7 and float(delta.std()) > EPS / 4  # U(-eps, eps), not clamped


@pytest.mark.parametrize("with_labels", [True, False])
def test_clean_views_once_equals_recomputing_them_at_every_pgd_step(batch, labels_file, with_labels):
    method, model = make(labels_file if with_labels else None)
    ref_method, ref_model = copy.deepcopy(method), copy.deepcopy(model)
    ref_method.recompute_clean = True
    loss, terms = method.step(model, batch, torch.arange(B), gen())
    ref_loss, ref_terms = ref_method.step(ref_model, batch, torch.arange(B), gen())
    assert torch.equal(loss, ref_loss)
    assert terms.keys() == ref_terms.keys() and all(torch.equal(terms[k], ref_terms[k]) for k in terms)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if p.grad is None:  # the pgd_ce set without pseudo labels
            assert q.grad is None and ".pgd_ce." in name
        else:
            assert torch.equal(p.grad, q.grad), name
    # only the "normal" BN set's running statistics saw different numbers of updates
    ours, ref = model.state_dict(), ref_model.state_dict()
    for key in ours:
        if ".sets.pgd" in key or ("running" not in key and "num_batches" not in key):
            assert torch.equal(ours[key], ref[key]), key
    assert not torch.equal(ours["backbone.bn1.sets.normal.num_batches_tracked"], ref["backbone.bn1.sets.normal.num_batches_tracked"])


def test_clean_once_attack_equals_the_recomputing_attack(batch, labels_file):
    method, model = make(labels_file)
    ref_model = copy.deepcopy(model)
    g = gen()
    x1, x2, x_org, x_hfc = method.views(batch, g)
    state = g.get_state()

    def clean_of(m):
        return [m.project(m.features(v, "normal")) for v in (x1, x2, x_hfc)]

    targets = method.targets(torch.arange(B))
    x_cl, x_ce = attack(model, x_org, clean_of(model), targets, g, method.cfg)
    g.set_state(state)
    ref_cl, ref_ce = attack(ref_model, x_org, None, targets, g, method.cfg, lambda: [z.detach() for z in clean_of(ref_model)])
    assert torch.equal(x_cl, ref_cl) and torch.equal(x_ce, ref_ce)


def test_simclr_step_is_nt_xent_of_two_views_in_one_batch(batch):
    from advcl_cli.data.augment import simclr_view, to_float

    settings = resolve(PretrainSettings, dict(arch="resnet18-tiny", method="simclr", base_temperature=0.5))
    method = SimCLR(settings, n_images=B)
    torch.manual_seed(0)
    model = create_model("resnet18-tiny", **method.model_config("resnet18-tiny")).train()
    loss, terms = method.step(model, batch, torch.arange(B), gen())
    assert torch.equal(loss.detach(), terms["contrast"]) and method.eps is None
    g, x = gen(), to_float(batch)
    z = model.project(model.features(torch.cat([simclr_view(x, g), simclr_view(x, g)]), "normal")).detach()
    logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    expected = torch.nn.functional.cross_entropy(logits, torch.cat([torch.arange(B) + B, torch.arange(B)]))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_steps_leave_no_tensors_behind(labels_file, batch):
    """No graph or tensor of a step (PGD iterations included) outlives it: the number of live
    tensors is the same after every training step."""
    import gc
    import warnings

    method, model = make(labels_file)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def live() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() touches deprecated module attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for step in range(3):
        loss, terms = method.step(model, batch, torch.arange(B), gen(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del loss, terms
        counts.append(live())
    assert counts[1] == counts[2], counts  # the first step creates the momentum buffers
