"""Finetuning: what each scheme may change, TRADES, the checkpoint it writes, selection, resume."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.settings.layering import resolve
from advcl_cli.attacks.pgd import trades_adversary, trades_loss
from advcl_cli.checkpoint import load_checkpoint, read_metadata, save_model, sha256_file
from advcl_cli.engine.finetune import finetune, protocol, split_validation, with_protocol
from advcl_cli.report import Reporter
from advcl_cli.errors import DataError, UsageError
from advcl_cli.models import backbone_with_bn_set, create_model
from advcl_cli.settings import FinetuneSettings
from training import InterruptAt

SMALL = dict(dataset="digits", epochs=2, limit=64, batch_size=32, eval_limit=8, image_size=16, attack_steps=2)


def make_encoder(path, sets=("normal", "pgd", "pgd_ce"), method="advcl"):
    """An encoder whose BN sets differ, so that starting from the wrong set would show."""
    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=sets, proj_dim=8, pseudo_ks=(2, 10) if method == "advcl" else ())
    for i, name in enumerate(sets):
        for m in enc.modules():
            if hasattr(m, "sets") and name in m.sets:
                m.sets[name].running_mean.fill_(0.01 * i)
                m.sets[name].running_var.fill_(1.0 + 0.1 * i)
                m.sets[name].weight.data.fill_(1.0 - 0.05 * i)
    return save_model(path, enc, kind="encoder", method=method, dataset="digits", eps=8 / 255)


@pytest.fixture
def encoder(tmp_path):
    return load_checkpoint(make_encoder(tmp_path / "enc.safetensors"))


def run(parent, out, **kw):
    settings = resolve(FinetuneSettings, dict(out=out, **{**SMALL, **kw}))
    return finetune(settings, parent, Reporter())


def backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


@pytest.mark.parametrize("scheme", ["slf", "alf"])
def test_linear_schemes_leave_the_encoder_untouched(encoder, tmp_path, scheme):
    start = backbone_with_bn_set(encoder.build(), "pgd", num_classes=10)
    result = run(encoder, tmp_path / scheme, scheme=scheme)
    clf = load_checkpoint(result.path).build()
    before, after = backbone_state(start), backbone_state(clf)
    assert before.keys() == after.keys()
    for k in before:  # every weight and BN statistic, num_batches_tracked included
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(start.fc.weight, clf.fc.weight)  # the head did train


def test_aff_changes_the_encoder(encoder, tmp_path):
    start = backbone_with_bn_set(encoder.build(), "pgd", num_classes=10)
    result = run(encoder, tmp_path / "aff", scheme="aff", epochs=1)
    clf = load_checkpoint(result.path).build()
    before, after = backbone_state(start), backbone_state(clf)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    bn_mean = next(k for k in before if k.endswith("running_mean"))
    assert not torch.equal(before[bn_mean], after[bn_mean])


def test_starts_from_the_pgd_bn_set_or_the_only_one(encoder, tmp_path):
    clf = load_checkpoint(run(encoder, tmp_path / "a", scheme="slf", epochs=1).path).build()
    assert clf.config.bn_sets == ("pgd",)
    assert torch.allclose(clf.backbone.bn1.sets["pgd"].running_mean, torch.full((8,), 0.01))
    simclr = load_checkpoint(make_encoder(tmp_path / "s.safetensors", sets=("normal",), method="simclr"))
    clf2 = load_checkpoint(run(simclr, tmp_path / "b", scheme="slf", epochs=1).path)
    assert clf2.model_config.bn_sets == ("normal",) and clf2.meta.method == "simclr"
    with pytest.raises(Exception, match="no batch-norm set 'pgd_ce'"):
        run(simclr, tmp_path / "c", scheme="slf", epochs=1, bn_set="pgd_ce")


@pytest.mark.parametrize("scheme", ["slf", "alf", "aff"])
def test_the_head_starts_at_zero_as_the_benchmarks(encoder, tmp_path, scheme):
    """RobustSSL's finetuning sets fc.weight and fc.bias to 0 before the first step, every scheme:
    the first step's head is then the gradient step from zero, whatever the seed."""
    from advcl_cli.engine.finetune import SCHEMES, build_classifier

    settings = resolve(FinetuneSettings, dict(scheme=scheme))
    for seed in (0, 1):
        torch.manual_seed(seed)
        fc = build_classifier(encoder, 10, SCHEMES[scheme](settings)).fc
        assert torch.equal(fc.weight, torch.zeros(10, 64)) and torch.equal(fc.bias, torch.zeros(10))
    # a classifier checkpoint keeps its head
    clf = load_checkpoint(run(encoder, tmp_path / "clf", scheme="slf", epochs=1).path)
    again = build_classifier(clf, 10, SCHEMES[scheme](settings))
    assert torch.equal(again.fc.weight, clf.build().fc.weight) and again.fc.weight.abs().max() > 0


def test_trades_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    model = create_model("resnet18-tiny", num_classes=10).eval()
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    x_adv = trades_adversary(model, x, 8 / 255, steps=2, step_size=2 / 255, gen=torch.Generator().manual_seed(0))
    ours = trades_loss(model, x, y, x_adv, beta=6.0)
    nat, adv = model(x), model(x_adv)
    kl_sum = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(adv, dim=1), F.softmax(nat, dim=1))
    direct = F.cross_entropy(nat, y) + 6.0 * kl_sum / 6
    by_hand = F.cross_entropy(nat, y) + 6.0 * (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum() / 6
    assert ours.item() == pytest.approx(direct.item(), rel=1e-5)
    assert ours.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert kl_sum.item() > 0  # the adversary did move the prediction


def test_checkpoint_metadata(encoder, tmp_path):
    result = run(encoder, tmp_path / "m", scheme="alf", epochs=1)
    meta = read_metadata(result.path)
    assert meta.kind == "classifier" and meta.method == "advcl" and meta.dataset == "digits"
    assert meta.parent == sha256_file(encoder.path)
    assert meta.config["scheme"] == "alf"
    assert (meta.config["batch_size"], meta.config["lr"], meta.config["milestones"]) == (32, 0.01, [15, 20])
    assert meta.metrics["n_eval"] == 8 and meta.metrics["selection"] == "last epoch"
    assert 0 <= meta.metrics["pgd20_acc"] <= meta.metrics["clean_acc"] <= 1
    assert meta.eps == pytest.approx(8 / 255) and meta.num_classes == 10
    assert (tmp_path / "m" / "metrics.jsonl").read_text().count("\n") == 1


def test_protocol_defaults_come_from_the_encoders_method_unless_given():
    aff = with_protocol(resolve(FinetuneSettings, dict(scheme="aff")), "advcl", "cifar10")
    assert (aff.batch_size, aff.lr, aff.milestones, aff.epochs) == (128, 0.1, [15, 20], 25)
    slf = with_protocol(resolve(FinetuneSettings, dict(scheme="slf", lr=0.05)), "advcl", "cifar10")
    assert (slf.batch_size, slf.lr, slf.milestones, slf.weight_decay, slf.epochs) == (512, 0.05, [15, 20], 2e-4, 25)
    assert protocol("simclr", "alf", "cifar100")["lr"] == 0.01  # the benchmark's default
    assert protocol("no-such-method", "aff", "cifar10")["batch_size"] == 128


def test_validation_split_selects_an_epoch_off_the_test_set(encoder, tmp_path):
    from advcl_cli.data.registry import load_dataset

    data = load_dataset("digits", "train", limit=50)
    train, val = split_validation(data, 0.2, seed=0)
    assert (len(train), len(val)) == (40, 10)
    all_rows = torch.cat([train.images, val.images]).flatten(1)
    assert torch.unique(all_rows, dim=0).shape[0] == torch.unique(data.images.flatten(1), dim=0).shape[0]

    result = run(encoder, tmp_path / "v", scheme="slf", epochs=3, val_fraction=0.25)
    m = read_metadata(result.path).metrics
    assert m["selection"] == "best val PGD-20" and 1 <= m["epoch"] <= 3
    records = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    best = max(range(3), key=lambda i: (records[i]["val_pgd20_acc"], -i))
    assert m["epoch"] == best + 1 and m["val_pgd20_acc"] == records[best]["val_pgd20_acc"]


def test_resume_after_an_interruption_matches_an_uninterrupted_run(encoder, tmp_path):
    full = run(encoder, tmp_path / "full", scheme="aff", epochs=2)
    settings = resolve(FinetuneSettings, dict(out=tmp_path / "cut", scheme="aff", **{**SMALL, "epochs": 2}))
    with pytest.raises(KeyboardInterrupt):
        finetune(settings, encoder, InterruptAt(3))  # 2 steps per epoch: the first step of epoch 2
    with pytest.raises(UsageError, match="unfinished run"):
        finetune(settings, encoder, Reporter())
    resumed = finetune(settings, encoder, Reporter(), resume=True)
    a, b = load_checkpoint(full.path).tensors, load_checkpoint(resumed.path).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="finished run"):
        finetune(settings, encoder, Reporter())


def test_classifier_parent_with_other_classes_is_refused(tmp_path):
    clf = create_model("resnet18-tiny", bn_sets=("pgd",), num_classes=7)
    parent = load_checkpoint(save_model(tmp_path / "c.safetensors", clf, kind="classifier", method="advcl", dataset="digits"))
    with pytest.raises(DataError, match="7 classes"):
        run(parent, tmp_path / "x", scheme="aff", epochs=1)


# --- ALF and AFF against their schemes written out ----------------------------------------------

ONE_STEP = dict(dataset="digits", epochs=1, limit=32, batch_size=32, eval_limit=8, image_size=16)  # one batch


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """An AdvCL encoder with differing BN sets whose running statistics fit the digits, so that
    its eval-mode features depend on the input (the default initialisation's do not)."""
    from advcl_cli.data.augment import to_float
    from advcl_cli.data.registry import load_dataset
    from nets import advcl_net

    enc = advcl_net(ks=(2, 10), dtype=torch.float32)
    x = to_float(load_dataset("digits", "train", limit=64, image_size=16).images)
    for m in enc.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass below
    with torch.no_grad():
        for bn in ("normal", "pgd", "pgd_ce"):
            enc.features(x, bn)
    path = tmp_path_factory.mktemp("enc") / "enc.safetensors"
    return load_checkpoint(save_model(path, enc.eval(), kind="encoder", method="advcl", dataset="digits", eps=8 / 255))


def first_batch(settings):
    """The engine's first batch of a one-epoch run and its epoch's random stream, after the
    crop + flip augmentation (the engine's order of draws: views first, then the attack)."""
    from advcl_cli.data.augment import crop_flip_view
    from advcl_cli.data.batches import Batches
    from advcl_cli.data.registry import load_dataset
    from advcl_cli.engine.run import epoch_generator

    data = load_dataset("digits", "train", limit=32, image_size=16)
    batches = Batches(data, 32, seed=settings.seed, drop_last=False)
    batches.set_epoch(0)
    images, labels, _ = next(iter(batches))
    gen = epoch_generator(settings.seed, 0, torch.device("cpu"))
    return crop_flip_view(images, gen), labels, gen


def start_model(encoder, settings):
    from advcl_cli.engine.finetune import SCHEMES, build_classifier

    torch.manual_seed(settings.seed)  # the engine seeds before building (the new head's init)
    return build_classifier(encoder, 10, SCHEMES[settings.scheme](settings))


def signed_ascent(model, x, start, loss_of, steps=10, eps=8 / 255, step=2 / 255):
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(model(x_adv)), [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def test_alf_trains_the_head_on_pgd10_examples(calibrated, tmp_path):
    encoder = calibrated
    settings = resolve(FinetuneSettings, dict(out=tmp_path / "alf", scheme="alf", **ONE_STEP))
    assert settings.attack_steps == 10 and settings.eps == pytest.approx(8 / 255)
    clf = load_checkpoint(finetune(settings, encoder, Reporter()).path).build()
    x, y, gen = first_batch(settings)
    model = start_model(encoder, settings).eval()
    uniform = x + (2 * torch.rand(x.shape, generator=gen) - 1) * (8 / 255)  # PGD's random start
    x_pgd = signed_ascent(model, x, uniform, lambda logits: F.cross_entropy(logits, y, reduction="sum"))

    def head_after_one_step(images):
        head = copy.deepcopy(model.fc)
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        with torch.no_grad():
            feat = model.features(images)
        F.cross_entropy(head(feat), y).backward()
        opt.step()
        return head.weight.detach()

    on_pgd, on_clean = head_after_one_step(x_pgd), head_after_one_step(x)
    torch.testing.assert_close(clf.fc.weight, on_pgd, rtol=0, atol=1e-6)
    assert (on_clean - on_pgd).abs().max() > 1e-4  # training on clean images would show


def test_aff_loss_is_trades_written_out(calibrated, tmp_path):
    """CE(clean) + 6 KL(p_clean || p_adv) summed over classes, batch mean; x_adv from
    x + 0.001 N(0, 1) ascending that KL for 10 steps of 2/255 in eval mode; the loss in train mode.
    From a classifier with a random head: a new head starts at zero, where the KL term is 0."""
    torch.manual_seed(0)
    clf = backbone_with_bn_set(calibrated.build(), "pgd", num_classes=10)
    calibrated = load_checkpoint(save_model(tmp_path / "clf.safetensors", clf, kind="classifier", method="advcl",
                                            dataset="digits", eps=8 / 255))
    settings = resolve(FinetuneSettings, dict(out=tmp_path / "aff", scheme="aff", **ONE_STEP))
    assert settings.trades_beta == 6.0 and settings.attack_steps == 10
    finetune(settings, calibrated, Reporter())
    logged = json.loads((tmp_path / "aff" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    x, y, gen = first_batch(settings)
    model = start_model(calibrated, settings).eval()

    def kl_sum(logits_nat, logits_adv):  # sum over the batch of KL(p_nat || p_adv)
        return (F.softmax(logits_nat, 1) * (F.log_softmax(logits_nat, 1) - F.log_softmax(logits_adv, 1))).sum()

    with torch.no_grad():
        nat = model(x)
    start = x + 0.001 * torch.randn(x.shape, generator=gen)
    x_adv = signed_ascent(model, x, start, lambda logits: kl_sum(nat, logits))
    model.train()
    logits_nat, logits_adv = model(x), model(x_adv)
    kl = (kl_sum(logits_nat, logits_adv) / len(y)).item()
    expected = F.cross_entropy(logits_nat, y).item() + 6.0 * kl
    assert kl > 1e-3 * expected  # the KL term is visible at the tolerance below
    assert logged == pytest.approx(expected, rel=1e-5)


def test_eval_limit_0_skips_the_final_evaluation(encoder, tmp_path, run_cli):
    code, out, err = run_cli("finetune", encoder.path, "--scheme", "slf", "--dataset", "digits", "--epochs", "1",
                             "--limit", "32", "--batch-size", "32", "--image-size", "16", "--eval-limit", "0",
                             "--out", tmp_path / "ft", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert "clean_acc" not in doc["metrics"] and "pgd20_acc" not in doc["metrics"] and "no final evaluation" in err
    assert "pgd20" not in err.lower().replace("pgd-20", "")  # no PGD-20 progress either
    assert read_metadata(doc["path"]).metrics == doc["metrics"]

