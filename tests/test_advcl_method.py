"""AdvCL's pieces: models and notes, views, the attack's ascent and terms, BN sets per view, SimCLR.

The step as a whole is compared with an independent reference in test_advcl_reference.py."""

import pytest
import torch

from advcl_cli.settings.layering import resolve
from advcl_cli.engine.pretrain import make_method
from advcl_cli.errors import UsageError
from advcl_cli.methods import get_method
from advcl_cli.attacks.pgd import uniform_noise
from advcl_cli.methods.advcl import AdvCL, attack
from advcl_cli.methods.simclr import SimCLR
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


def test_the_attack_raises_each_loss_above_a_random_perturbation_of_its_size(batch, labels_file):
    """x_cl's contrastive loss and x_ce's pseudo-label loss beat those of the same images moved by
    a fixed random +-eps perturbation (the ball's corners): the ascent, not the ball, is tested."""
    method, model = make(labels_file)
    g = gen()
    x1, x2, x_org, x_hfc = method.views(batch, g)
    with torch.no_grad():
        clean = [model.project(model.features(v, "normal")) for v in (x1, x2, x_hfc)]
    targets = method.targets(torch.arange(B))
    x_cl, x_ce = attack(model, x_org, clean, targets, g, method.settings)
    signs = torch.randn(x_org.shape, generator=torch.Generator().manual_seed(11)).sign()
    x_rand = (x_org + EPS * signs).clamp(0, 1)
    for x in (x_cl, x_ce):
        assert float((x - x_org).abs().max()) <= EPS + 1e-6 and float(x.min()) >= 0 and float(x.max()) <= 1

    def contrast(x):
        return float(supcon_loss(torch.stack([model.project(model.features(x, "pgd")), *clean], 1)))

    def ce(x):
        return float(pseudo_label_ce(model.pseudo_logits(model.features(x, "pgd_ce")), targets))

    with torch.no_grad():
        assert contrast(x_cl) > contrast(x_rand) and contrast(x_cl) > contrast(x_ce)
        assert ce(x_ce) > ce(x_rand) and ce(x_ce) > ce(x_cl)


def test_every_view_goes_through_its_bn_set(batch, labels_file, monkeypatch):
    """A spy records the BN set every backbone forward of one step uses (in every BN layer), the
    view it was given and the head its feature went to: x1, x2, x_HFC "normal", x_cl "pgd" (into
    the projection head), x_ce "pgd_ce" (into the pseudo-label heads); the clean views once, the
    adversarial ones at every PGD step and once more."""
    from advcl_cli.models import MultiBatchNorm2d

    method, model = make(labels_file)
    x1, x2, x_org, x_hfc = method.views(batch, gen())  # the step draws these first from the same seed
    calls, layers = [], []
    bn_forward = MultiBatchNorm2d.forward
    monkeypatch.setattr(MultiBatchNorm2d, "forward", lambda self, x, bn: (layers.append(bn), bn_forward(self, x, bn))[1])
    backbone = model.backbone.forward

    def backbone_spy(x, bn):
        layers.clear()
        out = backbone(x, bn)
        calls.append({"x": x.detach().clone(), "bn": bn, "layers": set(layers), "n": len(layers), "out": out, "heads": set()})
        return out

    def head_spy(name, module):
        forward = module.forward

        def spy(feat, *args):
            for c in calls:
                if c["out"] is feat:
                    c["heads"].add(name)
            return forward(feat, *args)
        return spy

    monkeypatch.setattr(model.backbone, "forward", backbone_spy)
    monkeypatch.setattr(model.proj, "forward", head_spy("proj", model.proj))
    for head in model.pseudo.values():
        monkeypatch.setattr(head, "forward", head_spy("pseudo", head))
    method.step(model, batch, torch.arange(B), gen())

    def view(c):
        for name, v in (("x1", x1), ("x2", x2), ("x_hfc", x_hfc)):
            if torch.equal(c["x"], v):
                return name
        assert float((c["x"] - x_org).abs().max()) <= EPS + 1e-6, "an input that is no view of the step"
        return {frozenset({"proj"}): "x_cl", frozenset({"pseudo"}): "x_ce"}.get(frozenset(c["heads"]), f"adversarial into {c['heads']}")

    seen = [(view(c), c["bn"]) for c in calls]
    expected = {"x1": "normal", "x2": "normal", "x_hfc": "normal", "x_cl": "pgd", "x_ce": "pgd_ce"}
    assert {v: bn for v, bn in seen} == expected and len(set(seen)) == 5, seen
    assert all(c["layers"] == {c["bn"]} and c["n"] == 20 for c in calls)  # every BN layer of resnet18
    steps = method.settings.pgd_steps
    assert [v for v, _ in seen].count("x_cl") == [v for v, _ in seen].count("x_ce") == steps + 1
    assert all([v for v, _ in seen].count(name) == 1 for name in ("x1", "x2", "x_hfc"))


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

    def run(clean, targets, cfg=method.settings):
        g.set_state(state)
        return attack(model, x_org, clean, targets, g, cfg)

    base_cl, base_ce = run(clean_a, targets_a)
    other_labels_cl, other_labels_ce = run(clean_a, targets_b)
    assert torch.equal(base_cl, other_labels_cl)  # x_cl does not see the pseudo-label term
    assert not torch.equal(base_ce, other_labels_ce)
    no_ce_cl, _ = run(clean_a, targets_a, method.settings.model_copy(update={"ce_weight": 0.0}))
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
    x_cl, x_ce = attack(model, x_org, [torch.zeros(B, 128)] * 3, None, gen(1), method.settings)
    assert x_ce is None
    delta = (x_cl - x_org).double() / EPS  # U(-1, 1): not clamped to [0, 1] at the start
    assert float(delta.abs().max()) <= 1 + 1e-5 and float(delta.min()) < -0.99 and float(delta.max()) > 0.99
    assert abs(float(delta.mean())) < 0.02 and abs(float(delta.std()) - 3 ** -0.5) < 0.01  # 24576 draws
    assert float(x_cl.min()) < 0 or float(x_cl.max()) > 1  # some pixels of the batch leave [0, 1]
    # the step draws both starts after the views, in the views' dtype
    g = gen(2)
    views = method.views(batch, g)
    noise = uniform_noise(views[2], g, count=2)
    assert noise.shape == (2, *x_org.shape) and not torch.equal(noise[0], noise[1])


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
