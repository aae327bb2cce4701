"""DynACL++'s post-processing (advcl lpaft): its two steps pinned to an independent reference
of the authors' LPAFT.py, the pseudo labels, what each phase trains, resume, the command line."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import advcl_cli.engine.lpaft as L
from advcl_cli.checkpoint import load_checkpoint, load_state, save_model, sha256_file
from advcl_cli.settings.layering import resolve
from advcl_cli.data.registry import load_dataset
from advcl_cli.report import Reporter
from advcl_cli.errors import UsageError
from advcl_cli.pseudolabels import extract_features, kmeans_labels, load_labels
from advcl_cli.settings import LpaftSettings, PretrainSettings
from advcl_cli.engine.pretrain import make_method
from nets import acl_family_net
from reference.lpaft import PGDRoute, train_head_step, train_step
from training import InterruptAt

SIZE, CPU = 16, torch.device("cpu")
SMALL = dict(dataset="digits", limit=32, batch_size=16, image_size=SIZE, probe_epochs=1, epochs=2, attack_steps=2,
             device="cpu")


def dynacl_encoder(path, method="dynacl"):
    """A DynACL encoder (BN sets normal/pgd, the three-layer head, ImageNet normalisation)
    whose BN sets differ, so that the wrong route shows."""
    dyn = make_method(resolve(PretrainSettings, {"method": "dynacl", "arch": "resnet18-tiny", "momentum_encoder": False}), 8)
    net = acl_family_net(dyn).float()
    return save_model(path, net, kind="encoder", method=method, dataset="digits", eps=8 / 255)


@pytest.fixture
def parent(tmp_path):
    return load_checkpoint(dynacl_encoder(tmp_path / "dynacl.safetensors"))


def lpaft_settings(**overrides):
    return resolve(LpaftSettings, {**SMALL, **overrides})


def batch(seed=0, n=8, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def networks(parent, head_seed=None):
    """(ours as the engine builds it, the reference's), float64; optionally the same random head."""
    ours = L.build_network(parent.build(), ("pgd",), 10).double()
    theirs = PGDRoute(parent.build(), 10).double()
    assert torch.equal(ours.fc.weight, torch.zeros(10, 64)) and torch.equal(ours.fc.bias, torch.zeros(10))
    if head_seed is not None:
        g = torch.Generator().manual_seed(head_seed)
        w, b = torch.randn(10, 64, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
        for net in (ours, theirs):
            with torch.no_grad():
                net.fc.weight.copy_(w)
                net.fc.bias.copy_(b)
    return ours, theirs


def assert_backbones_equal(ours, theirs, atol=1e-10):
    mine, ref = ours.backbone.state_dict(), theirs.encoder.backbone.state_dict()
    for key, value in mine.items():
        torch.testing.assert_close(value, ref[key], rtol=0, atol=atol, msg=key)


# --- the two steps ----------------------------------------------------------------------------


def test_the_probe_step_equals_the_reference_and_trains_the_head_only(parent):
    ours, theirs = networks(parent)
    before = copy.deepcopy(ours.backbone.state_dict())
    x, y = batch()
    s = lpaft_settings()
    probe, _ = L.optimizers(ours, s)
    loss, _ = L.Steps(s, "pgd").probe(ours, x, y, None, "fp32", CPU)
    probe.zero_grad()
    loss.backward()
    probe.step()
    ref_loss = train_head_step(theirs, x, y)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-12
    torch.testing.assert_close(ours.fc.weight, theirs.fc.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.fc.bias, theirs.fc.bias, rtol=0, atol=1e-12)
    assert float(ours.fc.weight.detach().abs().max()) > 1e-4  # it moved
    after = ours.backbone.state_dict()  # every weight and BN statistic as it was (eval mode, frozen)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in ours.backbone.parameters())
    assert_backbones_equal(ours, theirs, atol=0)


def test_the_trades_step_equals_the_reference(parent):
    ours, theirs = networks(parent, head_seed=3)
    x, y = batch(1)
    s = lpaft_settings(attack_steps=10)
    _, full = L.optimizers(ours, s)
    loss, _ = L.Steps(s, "pgd").trades(ours, x, y, torch.Generator().manual_seed(0), "fp32", CPU)
    full.zero_grad()
    loss.backward()
    full.step()
    ref_loss, x_adv = train_step(theirs, x, y)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-10, (float(loss.detach()), float(ref_loss.detach()))
    assert 4 / 255 < float((x_adv - x).abs().max()) <= 8 / 255 + 1e-12  # the attack moved
    assert_backbones_equal(ours, theirs)  # weights and both passes' BN statistics of the pgd route
    torch.testing.assert_close(ours.fc.weight, theirs.fc.weight, rtol=0, atol=1e-10)
    start = L.build_network(parent.build(), ("pgd",), 10).double().backbone.state_dict()
    assert float((ours.backbone.state_dict()["conv1.weight"] - start["conv1.weight"]).abs().max()) > 1e-4


def test_the_trades_attack_starts_at_x_without_noise(parent):
    """With no attack step the adversarial images are x itself: the clean and adversarial
    passes (train mode, same batch) agree and the KL term is exactly 0. From x + 0.001 N(0, 1)
    it would not be."""
    ours, _ = networks(parent, head_seed=4)
    x, y = batch(2)
    s = lpaft_settings().model_copy(update={"attack_steps": 0})
    loss, logits = L.Steps(s, "pgd").trades(ours, x, y, torch.Generator().manual_seed(0), "fp32", CPU)
    assert float(loss.detach()) == float(F.cross_entropy(logits, y).detach())


# --- the engine -------------------------------------------------------------------------------


def test_pseudo_labels_are_k_means_of_the_raw_normal_features_of_the_unaugmented_split(parent, tmp_path, monkeypatch):
    calls = {}

    def features(model, images, *, batch_size, bn):
        calls["features"] = (images.clone(), bn, model.training)
        return extract_features(model, images, batch_size=batch_size, bn=bn)

    def kmeans(feats, k, seed, *, normalize):
        calls["kmeans"] = (feats.clone(), k, normalize)
        return kmeans_labels(feats, k, seed, normalize=normalize)

    monkeypatch.setattr(L, "extract_features", features)
    monkeypatch.setattr(L, "kmeans_labels", kmeans)
    result = L.lpaft(lpaft_settings(out=tmp_path / "run", epochs=1), parent)
    images, bn, _ = calls["features"]
    assert bn == "normal"
    assert torch.equal(images, load_dataset("digits", "train", limit=32, image_size=SIZE).images)  # no augmentation
    feats, k, normalize = calls["kmeans"]
    assert (k, normalize) == (10, False) and feats.shape == (32, 64)
    stored = load_labels(tmp_path / "run" / L.LABELS_FILE)
    expected = kmeans_labels(feats, 10, 0, normalize=False)
    assert torch.equal(stored.labels[10], expected)
    assert stored.meta["encoder"] == parent.sha256 and stored.meta["n"] == 32
    assert torch.equal(load_state(tmp_path / "run" / "state.safetensors")["extra"]["labels"], expected)
    assert result.path.exists()


def test_both_phases_learn_the_pseudo_labels_not_the_true_ones(parent, tmp_path, monkeypatch):
    monkeypatch.setattr(L, "cluster_labels", lambda encoder, images, settings, bn: torch.full((len(images),), 3))
    L.lpaft(lpaft_settings(out=tmp_path / "run", probe_epochs=2, epochs=1, probe_lr=0.05, lr=0.01), parent)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["probe", "probe", "trades"]
    assert metrics[1]["train_acc"] == 1.0 and metrics[2]["train_acc"] == 1.0  # every image "is" cluster 3
    fc = load_state(tmp_path / "run" / "state.safetensors")["model"]["fc.bias"]
    assert int(fc.argmax()) == 3


def test_the_probe_leaves_the_encoder_alone_then_trades_trains_it(parent, tmp_path):
    run = tmp_path / "run"
    s = lpaft_settings(out=run, milestones=[1])
    with pytest.raises(KeyboardInterrupt):
        L.lpaft(s, parent, InterruptAt(3))  # 2 steps per epoch: the first TRADES step
    state = load_state(run / "state.safetensors")
    assert state["epoch"] == 1
    start = L.build_network(parent.build(), ("pgd",), 10).state_dict()
    probed = state["model"]
    for key in start:
        if not key.startswith("fc."):  # every weight and BN statistic, num_batches_tracked included
            assert torch.equal(probed[key], start[key]), key
    assert float(probed["fc.weight"].abs().max()) > 0
    result = L.lpaft(s, parent, Reporter(), resume=True)
    enc = load_checkpoint(result.path)
    assert (enc.meta.kind, enc.meta.method, enc.meta.parent) == ("encoder", "dynacl++", parent.sha256)
    cfg = enc.model_config
    assert cfg.bn_sets == ("pgd",) and cfg.proj_dim is None and cfg.num_classes is None
    assert (cfg.mean, cfg.std) == (parent.model_config.mean, parent.model_config.std)
    final = load_state(run / "state.safetensors")["model"]
    assert enc.tensors.keys() == {k for k in final if not k.startswith("fc.")}
    assert all(torch.equal(enc.tensors[k], final[k]) for k in enc.tensors)
    assert not torch.equal(final["backbone.conv1.weight"], start["backbone.conv1.weight"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the probe's constant rate, then TRADES' 0.1 with its milestones counted from its own first epoch
    assert [(m["phase"], m["lr"]) for m in metrics] == [("probe", 0.01), ("trades", 0.1), ("trades", pytest.approx(0.01))]


def test_resume_gives_the_uninterrupted_encoder(parent, tmp_path):
    full = L.lpaft(lpaft_settings(out=tmp_path / "full"), parent)
    for name, step in (("boundary", 2), ("trades", 4)):  # after the probe epoch; inside the second TRADES epoch
        s = lpaft_settings(out=tmp_path / name)
        with pytest.raises(KeyboardInterrupt):
            L.lpaft(s, parent, InterruptAt(step + 1))
        resumed = L.lpaft(s, parent, Reporter(), resume=True)
        a, b = load_file(full.path), load_file(resumed.path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(UsageError, match="post-processes another checkpoint"):
        L.lpaft(lpaft_settings(out=tmp_path / "full"), load_checkpoint(dynacl_encoder(tmp_path / "o.safetensors", "acl")),
                resume=True)


def test_dual_bn_keeps_the_normal_set_unchanged(parent, tmp_path):
    result = L.lpaft(lpaft_settings(out=tmp_path / "run", dual_bn=True, epochs=1), parent)
    enc = load_checkpoint(result.path)
    assert enc.model_config.bn_sets == ("normal", "pgd")
    changed = [k for k, v in enc.tensors.items() if not torch.equal(v, parent.tensors[k])]
    assert changed and all(".sets.normal." not in k for k in changed)
    assert any(".sets.pgd." in k for k in changed)


def test_methods_names_and_bad_inputs(parent, tmp_path):
    air = load_checkpoint(dynacl_encoder(tmp_path / "air.safetensors", method="dynacl-air"))
    assert (L.output_method(parent), L.output_method(air)) == ("dynacl++", "dynacl-air++")
    single = load_checkpoint(save_model(tmp_path / "simclr.safetensors", parent.build().float(), kind="classifier",
                                        method="dynacl", dataset="digits"))
    with pytest.raises(UsageError, match="lpaft post-processes a pretrained encoder"):
        L.lpaft(lpaft_settings(out=tmp_path / "x"), single)
    with pytest.raises(UsageError, match="no batch-norm set 'pgd_ce'"):
        L.lpaft(lpaft_settings(out=tmp_path / "y", bn_set="pgd_ce"), parent)
    with pytest.raises(UsageError, match="cannot make 40 clusters from 32 images"):
        L.lpaft(lpaft_settings(out=tmp_path / "z", clusters=40), parent)
    assert not (tmp_path / "z").exists()  # a failed check leaves no run folder
    with pytest.raises(UsageError, match="fewer than one batch of 64"):  # before k-means: nothing written
        L.lpaft(lpaft_settings(out=tmp_path / "b", batch_size=64), parent)
    assert not (tmp_path / "b").exists()
    with pytest.raises(UsageError, match="unknown dataset 'cifar11'"):
        L.lpaft(lpaft_settings(out=tmp_path / "w", dataset="cifar11"), parent)
    assert not (tmp_path / "w").exists()
    (tmp_path / "r").mkdir()
    inside = load_checkpoint(shutil.copy(parent.path, tmp_path / "r" / "encoder.safetensors"))
    with pytest.raises(UsageError, match="the checkpoint it post-processes"):
        L.lpaft(lpaft_settings(out=tmp_path / "r"), inside, force=True)
    assert inside.path.is_file() and sha256_file(inside.path) == sha256_file(parent.path)
    assert L.bn_routes(("normal", "pgd"), lpaft_settings(dual_bn=True)) == ("pgd", ("normal", "pgd"), "normal")
    with pytest.raises(UsageError, match="--dual-bn"):
        L.bn_routes(("normal",), lpaft_settings(dual_bn=True))


def test_dynacl_then_lpaft_then_finetune_and_eval_on_digits(run_cli, tmp_path):
    small = ["--dataset", "digits", "--limit", "32", "--image-size", str(SIZE), "--batch-size", "16", "--device", "cpu"]
    code, enc, err = run_cli("pretrain", "--method", "dynacl", "--arch", "resnet18-tiny", "--epochs", "1",
                             "--pgd-steps", "1", *small, "--out", tmp_path / "dynacl")
    assert code == 0, err
    code, post, err = run_cli("lpaft", enc.strip(), "--probe-epochs", "1", "--epochs", "1", "--attack-steps", "1",
                              *small, "--out", tmp_path / "lpaft")
    assert code == 0, err
    post = post.strip()
    assert "k-means (10 clusters)" in err and "LPAFT of" in err
    with safe_open(post, "pt") as f:
        meta = json.loads(f.metadata()["advcl"])
    assert meta["method"] == "dynacl++" and meta["parent"] == sha256_file(enc.strip()) and meta["kind"] == "encoder"
    assert meta["config"]["clusters"] == 10 and meta["model"]["bn_sets"] == ["pgd"]
    for scheme in ("slf", "aff"):  # the usual schemes take it with no extra flag
        code, clf, err = run_cli("finetune", post, "--scheme", scheme, "--epochs", "1", "--limit", "32",
                                 "--batch-size", "16", "--image-size", str(SIZE), "--attack-steps", "1",
                                 "--eval-limit", "8", "--device", "cpu", "--out", tmp_path / scheme)
        assert code == 0, err
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd5", "--limit", "16", "--image-size", str(SIZE),
                             "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 16 and 0 <= doc["robust"][0]["robust_acc"] <= doc["clean_acc"] <= 1
    code, _, err = run_cli("lpaft", clf.strip(), *small, "--out", tmp_path / "bad")
    assert code == 2 and "error:" in err and "lpaft post-processes a pretrained encoder" in err and "Traceback" not in err


def test_force_starts_over_in_a_clean_folder(parent, tmp_path):
    settings = lpaft_settings(out=tmp_path / "run", probe_epochs=1, epochs=1)
    L.lpaft(settings, parent)
    with pytest.raises(UsageError, match="already holds a finished run"):
        L.lpaft(settings, parent)
    L.lpaft(settings, parent, force=True)
    phases = [json.loads(line)["phase"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["probe", "trades"]  # the old run's lines are gone, not appended to
