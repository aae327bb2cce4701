"""`advcl import`: an original AdvCL checkpoint (DataParallel, bn_list, fc_XXX heads) -> encoder."""

from pathlib import Path

import pytest
import torch

from advcl_cli.checkpoint import load_checkpoint, sha256_file
from advcl_cli.errors import CheckpointError
from advcl_cli.importer import import_original
from advcl_cli.models import create_model

KS = (2, 10, 50, 100, 500)
SETS = ("normal", "pgd", "pgd_ce")
BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def randomise(model):
    """Distinct values everywhere, BN running statistics included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else -0.5))
            else:
                t.fill_(7)
    return model


def original_layout(model):
    """The state dict the authors' code would save for ``model``, written out name by name."""
    sd = model.state_dict()
    out = {"conv1.weight": sd["backbone.conv1.weight"]}

    def bn(orig, ours):
        for i, s in enumerate(SETS):
            for p in BN_PARAMS:
                out[f"{orig}.bn_list.{i}.{p}"] = sd[f"{ours}.sets.{s}.{p}"]

    bn("bn1", "backbone.bn1")
    for stage in range(4):
        for block in range(2):
            src, dst = f"backbone.layers.{stage}.{block}", f"layer{stage + 1}.{block}"
            out[f"{dst}.conv1.weight"] = sd[f"{src}.conv1.weight"]
            out[f"{dst}.conv2.weight"] = sd[f"{src}.conv2.weight"]
            bn(f"{dst}.bn1", f"{src}.bn1")
            bn(f"{dst}.bn2", f"{src}.bn2")
            if f"{src}.shortcut_conv.weight" in sd:
                out[f"{dst}.downsample.conv.weight"] = sd[f"{src}.shortcut_conv.weight"]
                bn(f"{dst}.downsample.bn", f"{src}.shortcut_bn")
    for i in (0, 1, 3):
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if f"proj.net.{i}.{p}" in sd:
                out[f"head_proj.{i}.{p}"] = sd[f"proj.net.{i}.{p}"]
    for k in KS:
        out[f"fc_{k:03d}.weight"] = sd[f"pseudo.k{k}.weight"]
        out[f"fc_{k:03d}.bias"] = sd[f"pseudo.k{k}.bias"]
    d = model.config.feature_dim
    for head, dims in (("head_pred", (128, 128, 128)), ("head_ce", (d, d, 1000))):
        out[f"{head}.0.weight"], out[f"{head}.0.bias"] = torch.randn(dims[1], dims[0]), torch.randn(dims[1])
        out[f"{head}.1.weight"], out[f"{head}.1.bias"] = torch.ones(dims[1]), torch.zeros(dims[1])
        out[f"{head}.1.running_mean"], out[f"{head}.1.running_var"] = torch.zeros(dims[1]), torch.ones(dims[1])
        out[f"{head}.1.num_batches_tracked"] = torch.tensor(3)
        out[f"{head}.3.weight"], out[f"{head}.3.bias"] = torch.randn(dims[2], dims[1]), torch.randn(dims[2])
    return {f"module.{k}": v.clone() for k, v in out.items()}


@pytest.fixture
def source():
    return randomise(create_model("resnet18-tiny", bn_sets=SETS, proj_dim=128, pseudo_ks=KS)).eval()


def save_original(path, state):
    torch.save({"model": state, "epoch": 400, "rng_state": torch.get_rng_state()}, path)
    return path


def test_import_maps_every_tensor(tmp_path, source):
    ckpt_path = save_original(tmp_path / "epoch_400.ckpt", original_layout(source))
    out = import_original(ckpt_path, tmp_path / "enc.safetensors")
    ckpt = load_checkpoint(out, kind="encoder")
    assert ckpt.model_config.bn_sets == SETS and ckpt.model_config.pseudo_ks == KS and ckpt.model_config.proj_dim == 128
    assert ckpt.meta.arch == "resnet18-tiny" and ckpt.meta.method == "advcl" and ckpt.meta.dataset == "cifar10"
    assert ckpt.meta.parent == sha256_file(ckpt_path) and ckpt.meta.config["epoch"] == 400
    expected = source.state_dict()
    assert ckpt.tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ckpt.tensors[key], value), key
    net = ckpt.build()
    x = torch.rand(4, 3, 32, 32)
    for bn in SETS:
        assert torch.equal(net.features(x, bn), source.features(x, bn))
    feat = source.features(x, "pgd")
    assert torch.equal(net.project(feat), source.project(feat))
    assert all(torch.equal(a, b) for a, b in zip(net.pseudo_logits(feat), source.pseudo_logits(feat)))


def test_unmatched_and_missing_tensors_fail_with_a_list(tmp_path, source):
    state = original_layout(source)
    state["module.layer1.0.bn1.bn_list.0.extra"] = torch.zeros(8)
    state["module.linear.weight"] = torch.zeros(10, 64)
    del state["module.layer2.0.downsample.conv.weight"]
    path = save_original(tmp_path / "bad.ckpt", state)
    with pytest.raises(CheckpointError) as err:
        import_original(path, tmp_path / "enc.safetensors")
    msg = err.value.message
    assert "unmatched: layer1.0.bn1.bn_list.0.extra, linear.weight" in msg
    assert "missing: backbone.layers.1.0.shortcut_conv.weight" in msg
    assert not (tmp_path / "enc.safetensors").exists()


def test_wrong_shape_fails(tmp_path, source):
    state = original_layout(source)
    state["module.fc_010.weight"] = torch.zeros(10, 3)
    with pytest.raises(CheckpointError, match="wrong shape: pseudo.k10.weight"):
        import_original(save_original(tmp_path / "shape.ckpt", state), tmp_path / "enc.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        import_original(path, tmp_path / "enc.safetensors")
    assert "code ran" not in capsys.readouterr().out
    (tmp_path / "junk.ckpt").write_bytes(b"junk" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        import_original(tmp_path / "junk.ckpt", tmp_path / "enc.safetensors")


def test_cli_import(run_cli, tmp_path, source):
    path = save_original(tmp_path / "epoch_400.ckpt", original_layout(source))
    code, out, err = run_cli("import", path, "--dataset", "cifar100")
    assert code == 0, err
    assert Path(out.strip()).name == "epoch_400.safetensors"
    assert load_checkpoint(out.strip()).meta.dataset == "cifar100"
    code, out, err = run_cli("import", path)
    assert code == 2 and "already exists" in err and "--force" in err
    code, out, err = run_cli("import", tmp_path / "nope.ckpt")
    assert code == 2 and "no such checkpoint file" in err


def test_both_imports_take_the_dataset_from_each_layer(run_cli, tmp_path, source, monkeypatch):
    """--dataset of `import` and `pseudo-labels import` is the one dataset setting: ADVCL_DATASET
    and the TOML file reach it as they reach every verb, below the flag."""
    from test_pseudo_labels import authors_pickle

    from advcl_cli.pseudolabels import load_labels

    ckpt = save_original(tmp_path / "epoch_400.ckpt", original_layout(source))
    pickle = tmp_path / "labels.pkl"
    authors_pickle(pickle, n_train=600, n_test=10)
    monkeypatch.setenv("ADVCL_DATASET", "cifar100")
    assert run_cli("import", ckpt, "--out", "env.safetensors")[0] == 0
    assert load_checkpoint("env.safetensors").meta.dataset == "cifar100"
    assert run_cli("pseudo-labels", "import", pickle, "--out", "env.labels")[0] == 0
    assert load_labels("env.labels").meta["dataset"] == "cifar100"
    assert run_cli("import", ckpt, "-d", "digits", "--out", "flag.safetensors")[0] == 0  # the flag beats the variable
    assert load_checkpoint("flag.safetensors").meta.dataset == "digits"
    monkeypatch.delenv("ADVCL_DATASET")
    Path("advcl.toml").write_text('dataset = "digits"\n[import]\nout = "toml.safetensors"\n')
    assert run_cli("import", ckpt)[0] == 0
    assert load_checkpoint("toml.safetensors").meta.dataset == "digits"
    Path("advcl.toml").write_text('[import]\ndataset = "cifar1000"\n')
    code, out, err = run_cli("pseudo-labels", "import", pickle, "--out", "bad.labels")
    assert code == 2 and "cifar1000" in err and not Path("bad.labels").exists()
