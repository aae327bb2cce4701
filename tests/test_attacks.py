"""Attacks: the registry, the eps-ball and [0, 1] invariants, and the order of their strength on
a tiny classifier trained on digits for a couple of seconds."""

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.attacks import get_attack
from advcl_cli.attacks.pgd import (cw_loss, fgsm, iterative_attack, pgd, pgd_ascent, project, trades_adversary, trades_kl,
                                   uniform_noise)
from advcl_cli.data.augment import to_float
from advcl_cli.data.registry import load_dataset
from advcl_cli.errors import UsageError
from advcl_cli.models import create_model
from training import fit


def train_tiny_classifier(image_size: int = 16, epochs: int = 4, seed: int = 0):
    """A resnet18-tiny classifier on digits, trained briefly, BN statistics recomputed at the
    end (a few hundred steps are too few for the running averages to settle)."""
    torch.manual_seed(seed)
    data = load_dataset("digits", "train", limit=512, image_size=image_size)
    x, y = to_float(data.images), data.labels
    model = create_model("resnet18-tiny", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fit(model, x, y, opt, epochs=epochs, batch_size=32)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass below
    with torch.no_grad():
        for i in range(0, len(y), 128):
            model(x[i : i + 128])
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    model = train_tiny_classifier()
    test = load_dataset("digits", "test", limit=64, image_size=16)
    return model, to_float(test.images), test.labels


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize(
    "name, canonical, kind, steps",
    [("fgsm", "fgsm", "fgsm", 1), ("pgd20", "pgd20", "pgd", 20), ("PGD-7", "pgd7", "pgd", 7),
     ("cw20", "cw20", "cw", 20), ("autoattack", "autoattack", "autoattack", 0),
     ("AutoAttack-Plus", "autoattack-plus", "autoattack", 0), ("autoattack-rand", "autoattack-rand", "autoattack", 0),
     ("apgd-ce", "apgd-ce", "autoattack", 0), ("APGD-T", "apgd-t", "autoattack", 0), ("fab-t", "fab-t", "autoattack", 0),
     ("square", "square", "autoattack", 0)],
)
def test_registry_parses_names(name, canonical, kind, steps):
    a = get_attack(name)
    assert (a.name, a.kind, a.steps) == (canonical, kind, steps)


@pytest.mark.parametrize("name", ["pgd", "pgd0", "deepfool", "cw", "pgd20x", ""])
def test_registry_rejects_unknown_names_listing_the_known_ones(name):
    with pytest.raises(UsageError) as e:
        get_attack(name)
    assert "unknown attack" in e.value.message and "pgdN" in e.value.hint and "autoattack" in e.value.hint


def random_corner(x, eps, seed=0):
    """x moved by a fixed random +-eps in every pixel (kept in [0, 1]): a perturbation as large
    as the attacks' that ascends nothing."""
    signs = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).sign()
    return (x + eps * signs).clamp(0, 1)


@pytest.mark.parametrize("name", ["fgsm", "pgd5", "cw5"])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_attacks_raise_their_loss_above_a_random_perturbation_of_their_size(trained, name, eps):
    model, x, y = trained
    x, y = x[:16].clone(), y[:16]
    x[0] = 0.0  # images at the range's edges must stay inside [0, 1]
    x[1] = 1.0
    x_adv = get_attack(name)(model, x, y, eps, gen=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6 and x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    loss = cw_loss if name.startswith("cw") else lambda logits, t: F.cross_entropy(logits, t, reduction="sum")
    with torch.no_grad():
        adv, rand, clean = (loss(model(v), y).item() for v in (x_adv, random_corner(x, eps), x))
    assert adv > rand and adv > clean, (adv, rand, clean)


def l2_norms(t):
    return t.flatten(1).norm(dim=1)


def random_l2(x, eps, seed=0):
    """x moved by eps along a fixed random direction (L2), kept in [0, 1]."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + eps * noise / l2_norms(noise).view(-1, 1, 1, 1)).clamp(0, 1)


@pytest.mark.parametrize("name", ["fgsm", "pgd5", "cw5"])
@pytest.mark.parametrize("eps", [0.25, 0.5])
def test_l2_attacks_step_inside_the_l2_ball_and_beat_a_random_perturbation_of_that_norm(trained, name, eps):
    model, x, y = trained
    x, y = x[:16].clone(), y[:16]
    x[0] = 0.0
    x[1] = 1.0
    seen = []

    def watched(z):  # every point the attack evaluates, its random start included
        seen.append(z.detach().clone())
        return model(z)

    attack = get_attack(name, "l2")
    assert attack.norm == "l2" and "L2" in attack.description
    x_adv = attack(watched, x, y, eps, gen=torch.Generator().manual_seed(0))
    assert len(seen) == attack.steps
    for z in [*seen, x_adv]:  # the random start is not clamped to [0, 1] (as under L-inf), the steps are
        assert l2_norms(z - x).max().item() <= eps + 1e-5
    for z in [*seen[1:], x_adv]:
        assert z.min().item() >= 0.0 and z.max().item() <= 1.0
    # not an L-inf attack in disguise: some pixel moves by more than an L-inf budget of 8/255
    assert (x_adv - x).abs().max().item() > 8 / 255
    loss = cw_loss if name.startswith("cw") else lambda logits, t: F.cross_entropy(logits, t, reduction="sum")
    with torch.no_grad():
        adv, rand, clean = (loss(model(v), y).item() for v in (x_adv, random_l2(x, eps), x))
    assert adv > rand and adv > clean, (adv, rand, clean)


def test_l2_projection_shortens_only_what_is_too_long():
    x = torch.full((3, 1, 4, 4), 0.5)
    delta = torch.zeros_like(x)
    delta[0, 0, 0, 0] = 0.3  # inside the ball: kept
    delta[1] = 0.1  # norm 0.4 spread over 16 pixels: kept
    delta[2, 0, :2, :2] = 0.45  # norm 0.9: shortened to 0.5 in the same direction
    out = project(x + delta, x, 0.5, "l2") - x
    assert torch.allclose(out[:2], delta[:2])
    assert abs(l2_norms(out[2:]).item() - 0.5) < 1e-6 and torch.allclose(out[2] / 0.5, delta[2] / 0.9)


def test_norms_parse_and_unknown_ones_are_refused():
    assert get_attack("pgd20").norm == "linf" and get_attack("pgd20", "L2").norm == "l2"
    with pytest.raises(UsageError, match="unknown norm"):
        get_attack("pgd20", "l1")


def test_trades_adversary_raises_the_kl_above_a_random_perturbation(trained):
    model, x, _ = trained
    x, eps = x[:8], 8 / 255
    x_adv = trades_adversary(model, x, eps, steps=3, step_size=2 / 255, gen=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert 0.0 <= x_adv.min().item() and x_adv.max().item() <= 1.0
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
        assert trades_kl(model(x_adv), p_nat).item() > trades_kl(model(random_corner(x, eps)), p_nat).item()


def test_trades_adversary_is_the_reference_loop(trained):
    """TRADES' inner maximisation as the RobustSSL code writes it: x + 0.001 N(0, 1), then
    signed steps on the summed KL to the clean softmax, projected after each step."""
    model, x, _ = trained
    x, eps, step = x[:8], 8 / 255, 2 / 255
    ours = trades_adversary(model, x, eps, steps=3, step_size=step, gen=torch.Generator().manual_seed(0))
    p_nat = F.softmax(model(x), dim=1).detach()
    x_adv = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(trades_kl(model(x_adv), p_nat), [x_adv])
        x_adv = project(x_adv.detach() + step * grad.sign(), x, eps)
    torch.testing.assert_close(ours, x_adv, rtol=0, atol=0)


def test_iterative_attack_starts_where_told():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.full((2, 3, 2, 2), 0.5)
    start = x + 0.5  # outside the ball: projected back even with no steps
    out = iterative_attack(model, x, torch.tensor([0, 1]), 0.1, 0, 0.01, start=start)
    assert torch.equal(out, torch.full_like(x, 0.6))


def test_pgd_ascent_moves_each_input_by_its_own_gradient_inside_its_own_ball():
    """Two inputs ascend one objective whose gradients are known (w1 . a + w2 . b^2 / 2): each
    step is the sign of each input's own gradient, each projection is onto its own origin's
    ball and [0, 1], the start is taken as given; written out in float64 here."""
    gen = torch.Generator().manual_seed(0)
    o1, o2 = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64), torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    w1 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    s1, s2 = o1 + 0.3 * (torch.rand(o1.shape, generator=gen, dtype=torch.float64) - 0.5), o2 - 0.05
    eps, step = 0.1, 0.04
    ours = pgd_ascent(lambda a, b: (w1 * a).sum() + (b * b).sum() / 2, (s1, s2), (o1, o2), eps, 4, step)
    a, b = s1.clone(), s2.clone()
    for _ in range(4):
        a = torch.clamp(torch.clamp(a + step * w1.sign(), o1 - eps, o1 + eps), 0, 1)
        b = torch.clamp(torch.clamp(b + step * b.sign(), o2 - eps, o2 + eps), 0, 1)
    assert torch.equal(ours[0], a) and torch.equal(ours[1], b)
    assert not any(t.requires_grad for t in ours)
    (unmoved,) = pgd_ascent(lambda a: a.sum(), (s1,), (o1,), eps, 0, step)
    assert torch.equal(unmoved, s1)  # no steps: the start, not projected


def test_pgd_ascent_l2_steps_along_the_normalised_gradient_and_rescales():
    gen = torch.Generator().manual_seed(1)
    o = torch.rand(3, 3, 4, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    w = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    eps, step = 0.5, 0.15
    unit = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for steps in (3, 5):  # inside the ball (0.45), then rescaled onto its sphere
        (ours,) = pgd_ascent(lambda a: (w * a).sum(), (o,), (o,), eps, steps, step, norm="l2")
        a = o.clone()
        for _ in range(steps):
            d = a + step * unit - o
            a = (o + d * (eps / d.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)).clamp(0, 1)
        torch.testing.assert_close(ours, a, rtol=0, atol=1e-12)
        assert float((ours - o).flatten(1).norm(dim=1).max()) <= eps + 1e-9


def test_uniform_noise_is_drawn_in_float32_whatever_the_dtype():
    like = torch.zeros(4, 3, 8, 8, dtype=torch.float64)
    ours = uniform_noise(like, torch.Generator().manual_seed(5), count=2)
    assert ours.shape == (2, 4, 3, 8, 8) and ours.dtype == torch.float64
    assert torch.equal(ours, (torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1).double())
    l2 = uniform_noise(like, torch.Generator().manual_seed(5), count=2, norm="l2")
    norms = l2.flatten(2).norm(dim=2)  # one radius per image of each input, in [0, 1]
    assert float(norms.max()) <= 1 + 1e-6 and len(set(norms.flatten().tolist())) == 8


def test_strength_order_on_a_trained_model(trained):
    model, x, y = trained
    eps = 16 / 255  # digits are easy: at 8/255 even FGSM barely moves a trained model
    clean = accuracy(model, x, y)
    acc_fgsm = accuracy(model, fgsm(model, x, y, eps), y)
    acc_pgd = accuracy(model, pgd(model, x, y, eps, 20, gen=torch.Generator().manual_seed(0)), y)
    assert clean >= 0.8  # the fixture trained something
    assert acc_pgd <= acc_fgsm <= clean
    assert acc_pgd < clean - 0.2  # and the attack is not a no-op


def test_attacks_leave_mode_and_parameter_grads_alone(trained):
    model, x, y = trained
    model.zero_grad(set_to_none=True)
    assert not model.training
    pgd(model, x[:4], y[:4], 8 / 255, 2)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_pgd_is_reproducible_with_a_seeded_generator(trained):
    model, x, y = trained
    a = pgd(model, x[:8], y[:8], 8 / 255, 3, gen=torch.Generator().manual_seed(1))
    b = pgd(model, x[:8], y[:8], 8 / 255, 3, gen=torch.Generator().manual_seed(1))
    c = pgd(model, x[:8], y[:8], 8 / 255, 3, gen=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pgd_step_size_is_2_over_255_at_8_over_255():
    """One step from a zero random start moves every pixel by exactly eps/4 = 2/255 (linear model)."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.full((2, 3, 4, 4), 0.5)
    y = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(0)
    start_noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = pgd(lin, x, y, 8 / 255, 1, gen=gen)
    moved = out - (x + start_noise * 8 / 255)
    inner = ((x + start_noise * 8 / 255 - x).abs() < 6 / 255)  # not clipped by the ball
    assert torch.allclose(moved[inner].abs(), torch.full_like(moved[inner], 2 / 255), atol=1e-6)


def test_cw_loss_is_the_clamped_margin():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 100.0, 1.0]])
    y = torch.tensor([0, 0])
    # row 0: margin 2 -> -(2 + 50); row 1: margin -100 -> clamped at 0
    assert cw_loss(logits, y).item() == pytest.approx(-52.0)
