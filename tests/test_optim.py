"""Optimisers and schedules against their formulas, written out here."""

import math

import pytest
import torch

from advcl_cli.optim import LARS, CosineAnnealing, MultiStep, WarmupCosine, build_optimizer, set_lr


def lars_by_hand(ws, gs_per_step, lr, momentum, wd, eta):
    """The ACL code's LARS, one parameter at a time, in float64 Python numbers."""
    ws = [[float(v) for v in w.flatten()] for w in ws]
    bufs = [[0.0] * len(w) for w in ws]
    for gs in gs_per_step:
        for w, g, buf in zip(ws, gs, bufs):
            g = [float(v) for v in g.flatten()]
            w_norm = math.sqrt(sum(v * v for v in w))
            g_norm = math.sqrt(sum(v * v for v in g))
            local = 1.0 if w_norm < 1e-15 or g_norm < 1e-15 else eta * w_norm / (g_norm + wd * w_norm)
            for i in range(len(w)):
                buf[i] = momentum * buf[i] + lr * local * (g[i] + wd * w[i])
                w[i] -= buf[i]
    return ws


def test_lars_follows_the_acl_formula_and_its_zero_norm_rule():
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(4, 3, generator=gen, dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),  # |w| = 0: local rate 1
        torch.randn(2, generator=gen, dtype=torch.float64) * 10,
    ]
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(3)]
    grads[1][2] = torch.zeros(2, dtype=torch.float64)  # |g| = 0 in one step
    expected = lars_by_hand(params, grads, lr=5.0, momentum=0.9, wd=1e-6, eta=1e-3)
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = LARS(ps, lr=5.0, momentum=0.9, weight_decay=1e-6, eta=1e-3)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    for p, want in zip(ps, expected):
        assert p.detach().flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    # weight decay reaches every parameter: with zero gradients the weights still shrink
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.1, eta=1e-3)
    w.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    assert w.detach().tolist() == pytest.approx([0.9] * 3)  # local rate 1 (|g| = 0), step lr * wd * w


def test_lars_state_resumes():
    w = torch.randn(6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    opt = LARS([w], lr=1.0)
    w.grad = torch.ones(6)
    opt.step()
    again = LARS([w], lr=1.0)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_build_optimizer():
    p = [torch.zeros(2, requires_grad=True)]
    assert isinstance(build_optimizer("lars", p, lr=1, momentum=0.9, weight_decay=1e-6), LARS)
    sgd = build_optimizer("sgd", p, lr=1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["weight_decay"] == 1e-4


def test_warmup_cosine_matches_the_advcl_formulas():
    s = WarmupCosine(base_lr=0.5, epochs=1000, warmup_epochs=10, warmup_from=0.01, min_ratio=1e-3)
    low = 0.5e-3
    cos = lambda t: low + (0.5 - low) * (1 + math.cos(math.pi * t / 1000)) / 2  # noqa: E731
    assert s.lr(0, 0, 100) == pytest.approx(0.01)
    assert s.lr(0, 50, 100) == pytest.approx(0.01 + 50 / 1000 * (cos(10) - 0.01))
    assert s.lr(9, 99, 100) == pytest.approx(0.01 + 999 / 1000 * (cos(10) - 0.01))
    assert s.lr(10, 0, 100) == pytest.approx(cos(11)) and s.lr(10, 99, 100) == s.lr(10, 0, 100)
    assert s.lr(999) == pytest.approx(low)
    no_warmup = WarmupCosine(base_lr=0.5, epochs=2)
    assert no_warmup.lr(0) == pytest.approx(low + (0.5 - low) / 2) and no_warmup.lr(1) == pytest.approx(low)


def test_cosine_annealing_matches_the_acl_lambda():
    """ACL: LambdaLR(cosine_annealing(step, epochs * n, 1, 1e-6 / lr, warmup 10 * n)) with
    scheduler.step() before every update, so update t (1-based) runs at the factor of step t."""
    n, epochs, lr, low = 7, 20, 5.0, 1e-6
    warm, total = 10 * n, epochs * n

    def acl(t):
        if t < warm:
            return lr * t / warm
        return lr * (low / lr + (1 - low / lr) * 0.5 * (1 + math.cos((t - warm) / (total - warm) * math.pi)))

    s = CosineAnnealing(base_lr=lr, epochs=epochs, warmup_epochs=10, min_lr=low, per="step")
    got = [s.lr(e, i, n) for e in range(epochs) for i in range(n)]
    assert got == pytest.approx([acl(t) for t in range(1, total + 1)], rel=1e-12)
    per_epoch = CosineAnnealing(base_lr=lr, epochs=epochs, warmup_epochs=0, min_lr=low, per="epoch")
    assert [per_epoch.lr(e, 3, n) for e in range(epochs)] == pytest.approx(
        [low + (lr - low) * 0.5 * (1 + math.cos(math.pi * (e + 1) / epochs)) for e in range(epochs)])


def test_multistep_and_set_lr():
    s = MultiStep(0.01, milestones=(15, 20))
    assert [s.lr(e) for e in (0, 14, 15, 19, 20, 24)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25
