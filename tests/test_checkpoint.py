import json
import os
import stat
import struct
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from advcl_cli import checkpoint
from advcl_cli.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_state,
    read_metadata,
    save_model,
    save_state,
    sha256_file,
)
from advcl_cli.errors import CheckpointError, DiskError, UsageError
from advcl_cli.models import create_model
from faults import disk_full


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    net = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=16, pseudo_ks=(2, 5))
    path = save_model(
        tmp_path / "enc.safetensors",
        net,
        kind="encoder",
        method="advcl",
        dataset="digits",
        eps=8 / 255,
        config={"epochs": 3, "lr": 0.5},
        metrics={"loss": 1.25},
        parent="ab" * 32,
    )
    return net, path


def test_round_trip(ckpt):
    net, path = ckpt
    loaded = load_checkpoint(path)
    assert loaded.meta.kind == "encoder" and loaded.meta.method == "advcl"
    assert loaded.meta.config == {"epochs": 3, "lr": 0.5} and loaded.meta.metrics == {"loss": 1.25}
    assert loaded.meta.parent == "ab" * 32 and loaded.meta.eps == pytest.approx(8 / 255)
    assert loaded.model_config == net.config
    state = net.state_dict()
    assert set(loaded.tensors) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded.tensors[k], v), k
    rebuilt = loaded.build()
    assert not rebuilt.training
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(rebuilt.features(x, "pgd"), net.features(x, "pgd"))
    assert loaded.sha256 == sha256_file(path) and len(loaded.sha256) == 64


def test_wrapper_prefixes_are_stripped(tmp_path):
    net = create_model("resnet18-tiny", num_classes=3)
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(wrapped)
    wrapped.module = net
    path = save_model(tmp_path / "c.safetensors", wrapped, kind="classifier", method="simclr", dataset="digits")
    assert all(not k.startswith("module.") for k in load_checkpoint(path).tensors)


def test_kind_check(ckpt):
    _, path = ckpt
    with pytest.raises(CheckpointError, match="is an encoder checkpoint; finetune it first") as e:
        load_checkpoint(path, kind="classifier")
    assert e.value.hint == f"advcl finetune {path} --scheme slf"


def test_sha256_is_computed_once(ckpt, monkeypatch):
    _, path = ckpt
    loaded = load_checkpoint(path)
    calls = []
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: calls.append(p) or "f" * 64)
    assert loaded.sha256 == loaded.sha256 == "f" * 64 and len(calls) == 1


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is a text file, not a model" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(bad)


def test_truncated(ckpt, tmp_path):
    _, path = ckpt
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def _rewrite_meta(path, tmp_path, change):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["advcl"])
    replaced = change(doc)  # edits doc in place, or returns what replaces it
    header["__metadata__"]["advcl"] = json.dumps(doc if replaced is None else replaced)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out = tmp_path / "edited.safetensors"
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return out


def test_unknown_format_version(ckpt, tmp_path):
    _, path = ckpt
    edited = _rewrite_meta(path, tmp_path, lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(edited)


@pytest.mark.parametrize("change", [lambda d: [d], lambda d: d.__delitem__("format_version")])
def test_metadata_without_a_format_version_is_damaged_not_newer(ckpt, tmp_path, change):
    _, path = ckpt
    with pytest.raises(CheckpointError, match="the advcl metadata is damaged") as e:
        load_checkpoint(_rewrite_meta(path, tmp_path, change))
    assert "upgrade" not in e.value.hint


@pytest.mark.parametrize(
    "field, value",
    [("num_classes", "ten"), ("proj_dim", 1.5), ("bn_sets", 5), ("pseudo_ks", ["a"]), ("arch", ["resnet18"])],
)
def test_wrong_model_value_types(ckpt, tmp_path, field, value):
    _, path = ckpt
    edited = _rewrite_meta(path, tmp_path, lambda d: d["model"].update({field: value}))
    with pytest.raises(CheckpointError, match=f"bad model field '{field}'"):
        load_checkpoint(edited)


def _raw_safetensors(path, header: dict, data: bytes = b"\0" * 256):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [64]}},  # no data_offsets
        {"w": {"dtype": "F32", "shape": [64], "data_offsets": "0-256"}},
        {"w": "not a table"},
        {"__metadata__": ["advcl"], "w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}},
        {"__metadata__": {"advcl": {"kind": "encoder"}}, "w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}},
        {"w": {"dtype": "F32", "shape": ["64"], "data_offsets": [0, 256]}},
        [1, 2, 3],
    ],
)
def test_malformed_headers_are_checkpoint_errors(tmp_path, header):
    path = _raw_safetensors(tmp_path / "odd.safetensors", header)
    with pytest.raises(CheckpointError, match="bad header"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="bad header"):
        read_metadata(path)


def test_unknown_arch(ckpt, tmp_path):
    _, path = ckpt
    edited = _rewrite_meta(path, tmp_path, lambda d: d["model"].update(arch="resnet999"))
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet999'"):
        load_checkpoint(edited)


def test_shape_mismatch(ckpt, tmp_path):
    _, path = ckpt
    edited = _rewrite_meta(path, tmp_path, lambda d: d["model"].update(proj_dim=32))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(edited)


def test_plain_safetensors_without_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(64)}, str(p))
    with pytest.raises(CheckpointError, match="not an advcl checkpoint"):
        read_metadata(p)


def test_atomic_write_keeps_old_file_on_failure(ckpt, monkeypatch):
    net, path = ckpt
    before = path.read_bytes()
    disk_full(monkeypatch, path.parent)
    with pytest.raises(DiskError, match=f"cannot write {path}: No space left on device"):
        save_model(path, net, kind="encoder", method="advcl", dataset="digits")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_a_rescued_write_lands_in_the_temporary_folder(ckpt, monkeypatch, tmp_path_factory):
    net, path = ckpt
    before = path.read_bytes()
    disk_full(monkeypatch, path.parent)
    spare = tmp_path_factory.mktemp("spare")  # beside the full folder, not in it
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    with pytest.raises(DiskError, match=f"cannot write {path}: No space left on device; saved it as ") as info:
        save_model(path, net, kind="encoder", method="advcl", dataset="digits", rescue=True)
    (rescued,) = spare.glob("advcl-rescued-*-enc.safetensors")
    assert str(rescued) in info.value.message and path.read_bytes() == before
    assert torch.equal(load_checkpoint(rescued).tensors["backbone.conv1.weight"], net.state_dict()["backbone.conv1.weight"])
    assert not list(spare.glob(".*.tmp"))

    disk_full(monkeypatch, spare)  # the spare folder is full too: both causes are said
    with pytest.raises(DiskError, match="could not be saved elsewhere either"):
        save_model(path, net, kind="encoder", method="advcl", dataset="digits", rescue=True)
    assert len(list(spare.iterdir())) == 1


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(ckpt, tmp_path):
    net, _ = ckpt
    with torch.no_grad():
        net.backbone.conv1.weight[0, 0, 0, 0] = float("nan")
        net.proj.net[0].bias.fill_(float("inf"))
    path = save_model(tmp_path / "bad.safetensors", net, kind="encoder", method="advcl", dataset="digits")
    with pytest.raises(CheckpointError, match=r"NaN or inf weights \(tensor 'backbone.conv1.weight': 1 of 216 values\)"):
        load_checkpoint(path)
    assert read_metadata(path).kind == "encoder"  # the metadata can still be read
    kept = load_checkpoint(path, allow_nonfinite=True)  # and the weights, from Python, when asked
    assert torch.isnan(kept.tensors["backbone.conv1.weight"]).sum() == 1


def test_atomic_write_syncs_and_gives_the_umask_mode(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "out.safetensors", lambda tmp: save_file({"w": torch.zeros(64)}, str(tmp)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 less the umask, not mkstemp's 0600
    assert events == ["fsync", "replace"] and not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_into_an_unwritable_place_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / "model.safetensors"
    with pytest.raises(UsageError, match=f"cannot write {target}"):
        atomic_write(target, lambda tmp: tmp.write_text("data"))
    with pytest.raises(UsageError, match="not a writable folder"):
        checkpoint.check_writable(target)


def test_resume_state_round_trip(tmp_path):
    net = create_model("resnet18-tiny")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.features(torch.rand(4, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "epoch": 4, "names": ["a", "b"]}
    back = load_state(save_state(tmp_path / "state.safetensors", state))
    assert back["epoch"] == 4 and back["names"] == ["a", "b"]
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_load_model_as_an_encoder_gives_the_chosen_bn_sets_features(tmp_path):
    from nets import randomise_batch_norms

    import advcl_cli

    net = randomise_batch_norms(create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=16, proj_head="mlp3"))
    path = save_model(tmp_path / "enc.safetensors", net.eval(), kind="encoder", method="acl", dataset="digits")
    x = torch.rand(3, 3, 32, 32)
    with pytest.raises(CheckpointError, match="encoder checkpoint"):
        advcl_cli.load_model(path)  # the default kind is still the classifier
    features = advcl_cli.load_model(path, kind="encoder")
    assert isinstance(features, torch.nn.Module) and not features.training
    with torch.no_grad():
        out = features(x)
        assert out.shape == (3, 64)
        assert torch.equal(out, net.features(x, "pgd"))  # the robust set by default
        assert torch.equal(advcl_cli.load_model(path, kind="encoder", bn_set="normal")(x), net.features(x, "normal"))
        assert not torch.equal(out, net.features(x, "normal"))
    clf = create_model("resnet18-tiny", num_classes=10).eval()
    clf_path = save_model(tmp_path / "clf.safetensors", clf, kind="classifier", method="simclr", dataset="digits")
    with torch.no_grad():  # a classifier's encoder: its backbone, the head left out
        assert torch.equal(advcl_cli.load_model(clf_path, kind="encoder")(x), clf.features(x))
    with pytest.raises(UsageError, match="kind must be"):
        advcl_cli.load_model(path, kind="features")
