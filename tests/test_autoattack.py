"""AutoAttack through pyautoattack: standard settings, the eps-ball, and AA <= PGD-20.

The standard version's Square (5000 queries) and FAB-T cost about a second per image that
survives the gradient attacks on a CPU, so these tests use a small CNN on 16x16 digits and
8 images."""

import pytest
import torch
from torch import nn

from advcl_cli.attacks import autoattack as aa_module
from advcl_cli.attacks import get_attack
from advcl_cli.attacks.pgd import pgd
from advcl_cli.data.augment import to_float
from advcl_cli.data.registry import load_dataset
from advcl_cli.errors import UsageError
from training import fit


def small_cnn(n_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128, n_classes),
    )


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train = load_dataset("digits", "train", image_size=16)
    x, y = to_float(train.images), train.labels
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fit(model, x, y, opt, epochs=4, batch_size=64)
    test = load_dataset("digits", "test", limit=8, image_size=16)
    return model.eval(), to_float(test.images), test.labels


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_autoattack_is_at_least_as_strong_as_pgd20_and_stays_in_the_ball(trained):
    model, x, y = trained
    eps = 8 / 255
    clean = accuracy(model, x, y)
    x_pgd = pgd(model, x, y, eps, 20, gen=torch.Generator().manual_seed(0))
    x_aa = get_attack("autoattack")(model, x, y, eps, seed=0)
    assert clean >= 0.75
    assert (x_aa - x).abs().max().item() <= eps + 1e-6
    assert x_aa.min().item() >= 0 and x_aa.max().item() <= 1
    # AutoAttack counts an image robust only if its clean prediction is right too
    with torch.no_grad():
        aa_robust = ((model(x_aa).argmax(1) == y) & (model(x).argmax(1) == y)).float().mean().item()
    assert aa_robust <= accuracy(model, x_pgd, y)
    assert aa_robust < clean  # it found something


def apgd_settings(a) -> dict:
    return {"n_iter": a.n_iter, "n_restarts": a.n_restarts, "eot_iter": a.eot_iter, "rho": a.thr_decr,
            "random_start": a.use_rs, "largereps": a.use_largereps, "checkpoints": (a.n_iter_2, a.n_iter_min, a.size_decr),
            "eps": a.eps, "norm": a.norm}


def test_standard_settings_are_set_explicitly(trained, monkeypatch):
    import pyautoattack

    seen = {}

    def spy(self, x, y, *, batch_size=250, state_path=None):
        seen.update(
            attacks=list(self.attacks_to_run), version=self.version, eps=self.epsilon, norm=self.norm, seed=self.seed,
            **{name: apgd_settings(a) for name, a in (("apgd", self.apgd), ("apgd_t", self.apgd_targeted))},
            apgd_t_targets=self.apgd_targeted.n_target_classes, apgd_loss=self.apgd.loss, apgd_t_loss=self.apgd_targeted.loss,
            fab=(self.fab.n_iter, self.fab.n_restarts, self.fab.n_target_classes, self.fab.alpha_max, self.fab.eta,
                 self.fab.beta, self.fab.eps, self.fab.norm),
            square=(self.square.n_queries, self.square.p_init, self.square.n_restarts, self.square.loss,
                    self.square.rescale_schedule, self.square.eps, self.square.norm),
            every={name: _attributes(obj) for name, obj in _components(self).items()},
        )
        return x.clone(), y.clone()

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    model, x, y = trained
    aa_module.autoattack(model, x[:2], y[:2], 8 / 255, seed=3)
    every = seen.pop("every")
    # the standard version's values (Croce & Hein 2020; fra31/auto-attack's AutoAttack(version="standard"))
    apgd = {"n_iter": 100, "n_restarts": 1, "eot_iter": 1, "rho": 0.75, "random_start": True, "largereps": False,
            "checkpoints": (22, 6, 3), "eps": 8 / 255, "norm": "Linf"}
    assert seen == {
        "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "version": "standard", "eps": 8 / 255, "norm": "Linf",
        "seed": 3, "apgd": apgd, "apgd_t": apgd, "apgd_t_targets": 9, "apgd_loss": "ce", "apgd_t_loss": "dlr-targeted",
        "fab": (100, 1, 9, 0.1, 1.05, 0.9, 8 / 255, "Linf"), "square": (5000, 0.8, 1, "margin", False, 8 / 255, "Linf"),
    }
    assert "pyautoattack" in aa_module.describe() and "5000" in aa_module.describe()
    # every attribute the package's attacks read, compared with the package's own standard version
    # (a misspelt name would add an attribute that no attack reads, and miss the real one)
    standard = pyautoattack.AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=3, device=x.device)
    standard.verbose = False  # advcl's one choice of its own: no per-attack printing
    want = {name: _attributes(obj) for name, obj in _components(standard).items()}
    assert every.keys() == want.keys()
    for name in want:
        assert every[name] == want[name], name


def _components(adversary) -> dict:
    return {"autoattack": adversary, **{n: getattr(adversary, n) for n in ("apgd", "apgd_targeted", "fab", "square")}}


def _attributes(obj) -> dict:
    """An attack's attributes by the package's names: plain values as they are, the model and the
    attack objects as what they are (the model is the same object in both)."""
    plain = (int, float, str, bool, type(None), list, tuple)
    return {k: v if isinstance(v, plain) else type(v).__name__ for k, v in vars(obj).items()}


def test_what_the_package_prints_goes_to_stderr(trained, monkeypatch, capsys):
    import pyautoattack

    def chatty(self, x, y, *, batch_size=250, state_path=None):
        print("robust accuracy: 50.00%")
        return x.clone(), y.clone()

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", chatty)
    model, x, y = trained
    capsys.readouterr()
    aa_module.autoattack(model, x[:2], y[:2], 8 / 255)
    out, err = capsys.readouterr()
    assert out == "" and "robust accuracy: 50.00%" in err


def test_fewer_classes_shrink_the_targets(monkeypatch):
    import pyautoattack

    seen = {}

    def spy(self, x, y, *, batch_size=250, state_path=None):
        seen["targets"] = (self.apgd_targeted.n_target_classes, self.fab.n_target_classes)
        return x.clone(), y.clone()

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    model = small_cnn(5).eval()
    aa_module.autoattack(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), 8 / 255)
    assert seen["targets"] == (4, 4)


def test_three_classes_are_refused():
    model = small_cnn(3).eval()
    with pytest.raises(UsageError, match="at least 4 classes"):
        aa_module.autoattack(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), 8 / 255)
    with pytest.raises(UsageError, match="at least 3 classes"):  # the DLR loss reads the third logit
        aa_module.autoattack(small_cnn(2).eval(), torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), 8 / 255,
                             version="autoattack-rand")
    # APGD-CE and Square alone need no third class
    x_adv = aa_module.autoattack(small_cnn(2).eval(), torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), 8 / 255,
                                 version="apgd-ce")
    assert x_adv.shape == (2, 3, 8, 8)


def test_global_rng_is_left_alone_and_warnings_are_forwarded(trained):
    _, x, y = trained
    zero = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    nn.init.zeros_(zero[1].weight)
    nn.init.zeros_(zero[1].bias)  # constant logits: zero gradients, a warning from the checks
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    warnings = []
    aa_module.autoattack(zero.eval(), x[:2], y[:2], 8 / 255, log=warnings.append)
    assert torch.equal(torch.rand(3), expected)
    assert any("zero gradient" in w for w in warnings)


# what each advcl name runs, by the package's names (the order is the package's)
RUNS = {
    "autoattack": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "autoattack-plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "autoattack-rand": ["apgd-ce", "apgd-dlr"],
    "apgd-ce": ["apgd-ce"], "apgd-t": ["apgd-t"], "fab-t": ["fab-t"], "square": ["square"],
}
PACKAGE_VERSION = {"autoattack-plus": "plus", "autoattack-rand": "rand"}  # the rest: standard


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_version_and_component_has_the_packages_own_settings(name, norm, eps):
    """Attribute by attribute against the package's own ``AutoAttack(version=...)`` (a component:
    the standard version running only it), under both norms."""
    import pyautoattack

    model = small_cnn().eval()
    x = torch.rand(2, 3, 16, 16)
    adversary = aa_module.build(model, x, eps, seed=5, version=name, norm=norm)
    version = PACKAGE_VERSION.get(name, "standard")
    package_norm = {"linf": "Linf", "l2": "L2"}[norm]
    want = pyautoattack.AutoAttack(model, norm=package_norm, eps=eps, version=version, seed=5, device=x.device)
    want.verbose = False
    want.attacks_to_run = RUNS[name]
    assert adversary.attacks_to_run == RUNS[name]
    got = {n: _attributes(obj) for n, obj in _components(adversary).items()}
    expected = {n: _attributes(obj) for n, obj in _components(want).items()}
    for part in expected:
        assert got[part] == expected[part], part
    # the values themselves, so that a change of the package's defaults shows here too
    eot, restarts = {"autoattack-rand": (20, 1), "autoattack-plus": (1, 5)}.get(name, (1, 1))
    assert (adversary.apgd.eot_iter, adversary.apgd.n_restarts, adversary.apgd.n_iter) == (eot, restarts, 100)
    assert adversary.norm == package_norm and adversary.apgd.norm == package_norm and adversary.square.norm == package_norm
    assert adversary.epsilon == eps and adversary.square.n_queries == 5000 and adversary.fab.n_target_classes == 9
    described = get_attack(name, norm).description
    assert package_norm in described and all(n.upper() in described.upper() for n in RUNS[name])


def test_autoattack_l2_stays_in_the_l2_ball(trained):
    model, x, y = trained
    x_adv = get_attack("apgd-ce", "l2")(model, x, y, 0.5, seed=0)
    assert (x_adv - x).flatten(1).norm(dim=1).max().item() <= 0.5 + 1e-5
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean().item() < accuracy(model, x, y)
