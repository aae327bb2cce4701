"""Sanity flags of robust evaluations (engine/sanity.py): a model built to mask gradients, a
randomised one and one stuck in train mode raise their flags; a normal model raises none; the
numbers' checks (adversarial above clean, accuracy rising with eps, PGD-20 against PGD-100 x 5)."""

import copy

import pytest
import torch
from torch import nn

from advcl_cli.engine import sanity
from advcl_cli.engine.evaluate import evaluate
from advcl_cli.report import RecordingReporter
from test_eval import test_data, trained  # noqa: F401  (the fixtures: a tiny digits classifier, 48 test images)


def checks(res):
    return [f["check"] for f in res["flags"]]


def warnings(rec):
    return [e[1] for e in rec.events if e[0] == "warn"]


def test_a_normal_model_raises_no_flag_over_a_sweep_with_the_pgd_check(trained, test_data):
    rec = RecordingReporter()
    res = evaluate(trained, test_data, ["pgd10"], [2 / 255, 4 / 255, 8 / 255], batch_size=16, reporter=rec, pgd_check=8)
    assert res["flags"] == [] and not any(w.startswith("flag") for w in warnings(rec))
    assert [r["eps_label"] for r in res["pgd_check"]] == ["2/255", "4/255", "8/255"]
    for row in res["pgd_check"]:
        assert row["n"] == 8 and row["pgd100x5_acc"] <= row["pgd20_acc"] + sanity.PGD_MARGIN
    for r in res["robust"]:
        assert r["norm"] == "linf" and r["robust_acc"] <= r["adv_acc"] <= res["clean_acc"]


def quantised(model, levels=4):
    """The model behind a non-differentiable input quantisation: its input gradient is zero."""
    masked = copy.deepcopy(model)
    masked.register_forward_pre_hook(lambda m, args: (torch.round(args[0] * levels) / levels, *args[1:]))
    return masked


def test_input_quantisation_raises_the_gradient_masking_flag(trained, test_data):
    rec = RecordingReporter()
    res = evaluate(quantised(trained), test_data, ["pgd10"], [8 / 255], batch_size=16, reporter=rec)
    assert checks(res) == ["gradients"]
    (f,) = res["flags"]
    assert "16 of 16 images" in f["message"] and "gradient masking" in f["suggests"]
    (line,) = [w for w in warnings(rec) if w.startswith("flag")]
    assert "\n" not in line and "gradient masking" in line


def test_a_randomised_model_is_flagged(trained, test_data):
    noisy = copy.deepcopy(trained)
    noisy.register_forward_pre_hook(lambda m, args: (args[0] + 0.1 * torch.randn_like(args[0]), *args[1:]))
    res = evaluate(noisy, test_data, ["fgsm"], [8 / 255], batch_size=16)
    assert "randomness" in checks(res)
    assert "autoattack-rand" in next(f["suggests"] for f in res["flags"] if f["check"] == "randomness")


class Stubborn(nn.Module):
    """A head that stays in train mode whatever it is told (a user's custom module)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def train(self, mode=True):
        return super().train(True)

    def forward(self, x):
        return self.inner(x)


def test_a_module_left_in_train_mode_is_flagged(trained, test_data):
    stuck = copy.deepcopy(trained)
    stuck.fc = Stubborn(stuck.fc)
    res = evaluate(stuck, test_data, ["fgsm"], [8 / 255], batch_size=16)
    assert checks(res) == ["train-mode"] and "fc" in res["flags"][0]["message"]


def row(attack, eps, robust, adv=None):
    return {"attack": attack, "eps": eps, "eps_label": f"{round(eps * 255)}/255", "robust_acc": robust,
            "adv_acc": robust if adv is None else adv}


def test_the_numbers_checks():
    falling = [row("pgd20", 2 / 255, 0.6), row("pgd20", 4 / 255, 0.4), row("pgd20", 8 / 255, 0.2)]
    assert sanity.result_flags(0.9, falling) == []
    rising = [row("pgd20", 8 / 255, 0.2), row("pgd20", 2 / 255, 0.6), row("pgd20", 4 / 255, 0.65)]  # any order
    (f,) = sanity.result_flags(0.9, rising)
    assert f["check"] == "eps-not-falling" and f["eps"] == 4 / 255 and "masking" in f["suggests"]
    assert sanity.result_flags(0.9, [row("pgd20", 2 / 255, 0.6), row("pgd20", 4 / 255, 0.605)]) == []  # within noise
    # another attack's lower number is no rise
    assert sanity.result_flags(0.9, [row("fgsm", 4 / 255, 0.7), row("pgd20", 8 / 255, 0.3)]) == []
    (f,) = sanity.result_flags(0.5, [row("pgd20", 8 / 255, 0.4, adv=0.55)])
    assert f["check"] == "robust-above-clean" and "randomised" in f["suggests"]
    assert sanity.result_flags(0.5, [row("pgd20", 8 / 255, 0.4, adv=0.5)]) == []


def test_pgd_check_flags_a_pgd20_weaker_than_pgd100_with_restarts(trained, test_data, monkeypatch):
    """With PGD-20 replaced by doing nothing, the stronger attack is far below it: flagged."""
    real = sanity.get_attack
    monkeypatch.setattr(sanity, "get_attack", lambda name, norm: (lambda m, x, y, eps, gen=None: x)
                        if name == "pgd20" else real(name, norm))
    res = evaluate(trained, test_data, ["fgsm"], [16 / 255], batch_size=16, pgd_check=8)
    (f,) = [f for f in res["flags"] if f["check"] == "pgd-check"]
    assert "too weak" in f["suggests"] and res["pgd_check"][0]["pgd20_acc"] > res["pgd_check"][0]["pgd100x5_acc"]
