import pytest
import torch

from advcl_cli.errors import CheckpointError
from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, backbone_with_bn_set, create_model


def test_resnet18_is_the_cifar_variant():
    net = create_model("resnet18")
    stem = net.backbone.conv1
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net.config.feature_dim == 512
    assert sum(p.numel() for p in net.parameters()) == 11_168_832  # CIFAR ResNet-18, no heads
    assert net.features(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_tiny_has_the_same_topology_at_width_8():
    big, tiny = create_model("resnet18"), create_model("resnet18-tiny")
    assert [k for k in big.state_dict()] == [k for k in tiny.state_dict()]
    assert tiny.features(torch.rand(2, 3, 32, 32)).shape == (2, 64)


def test_heads():
    net = create_model("resnet18-tiny", proj_dim=128, pseudo_ks=(2, 10, 50), num_classes=7)
    x = torch.rand(4, 3, 32, 32)
    feat = net.features(x)
    z = net.project(feat)
    assert z.shape == (4, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert [t.shape[1] for t in net.pseudo_logits(feat)] == [2, 10, 50]
    assert net(x).shape == (4, 7)
    proj = net.proj.net
    assert isinstance(proj[1], torch.nn.BatchNorm1d) and proj[0].in_features == proj[0].out_features == 64


def test_bn_sets_are_separate_and_selected_per_call():
    torch.manual_seed(0)
    net = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"))
    net.train()
    net.features(torch.rand(8, 3, 32, 32) * 3, bn="pgd")
    stats = {s: net.backbone.bn1.sets[s].running_mean.clone() for s in ("normal", "pgd", "pgd_ce")}
    assert torch.all(stats["normal"] == 0) and torch.all(stats["pgd_ce"] == 0)
    assert not torch.all(stats["pgd"] == 0)
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(net.features(x, "pgd"), net.features(x, "normal"))
    assert torch.equal(net.features(x), net.features(x, "normal"))  # default = first set
    with pytest.raises(KeyError):
        net.features(x, "nosuch")


def test_backbone_with_bn_set_copies_that_set():
    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=128)
    enc.train()
    enc.features(torch.rand(8, 3, 32, 32), bn="pgd")
    clf = backbone_with_bn_set(enc, "pgd", num_classes=10).eval()
    enc.eval()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(clf.features(x), enc.features(x, "pgd"))
    assert clf.config.bn_sets == ("pgd",) and clf.config.num_classes == 10 and clf.proj is None
    with pytest.raises(CheckpointError):
        backbone_with_bn_set(enc, "adv")


def test_unknown_arch_and_config_round_trip():
    with pytest.raises(CheckpointError, match="unknown architecture"):
        create_model("vgg")
    cfg = ModelConfig("resnet18-tiny", bn_sets=("a", "b"), proj_dim=128, pseudo_ks=(2, 10), num_classes=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CheckpointError, match="unknown model fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 50})
    for field, bad in [("num_classes", "10"), ("num_classes", True), ("proj_dim", 0), ("bn_sets", "pgd"),
                       ("bn_sets", [1]), ("pseudo_ks", [2, -1]), ("arch", None)]:
        with pytest.raises(CheckpointError, match=f"bad model field '{field}'"):
            ModelConfig.from_dict({**cfg.to_dict(), field: bad})
    with pytest.raises(CheckpointError, match="not a table"):
        ModelConfig.from_dict(["resnet18"])


def test_normalisation_inside_the_model_is_imagenets_and_survives_the_checkpoint(tmp_path):
    from advcl_cli.checkpoint import load_checkpoint, save_model
    from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    plain = create_model("resnet18-tiny", bn_sets=("normal", "pgd")).eval()
    normed = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), mean=IMAGENET_MEAN, std=IMAGENET_STD).eval()
    normed.load_state_dict(plain.state_dict())  # the same weights: the state dict has no normalisation
    x = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normed.features(x, "pgd"), plain.features((x - mean) / std, "pgd"))
    assert not torch.allclose(normed.features(x), plain.features(x))
    clf = backbone_with_bn_set(normed, "pgd", num_classes=4).eval()  # finetuning keeps it
    assert clf.config.mean == IMAGENET_MEAN and clf.config.std == IMAGENET_STD
    path = save_model(tmp_path / "m.safetensors", clf, kind="classifier", method="acl", dataset="digits")
    rebuilt = load_checkpoint(path).build()
    torch.testing.assert_close(rebuilt(x), clf(x))
    torch.testing.assert_close(rebuilt.features(x), plain.features((x - mean) / std, "pgd"))


def test_the_acl_projection_head_has_three_layers_with_a_bn_per_set():
    torch.manual_seed(0)
    net = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=64, proj_head="mlp3")
    keys = [k for k in net.state_dict() if k.startswith("proj.")]
    assert {k.split(".")[1] for k in keys} == {"fc1", "bn1", "fc2", "bn2", "fc3", "bn3"}
    assert net.proj.fc1.bias is not None and net.proj.fc2.bias is None and net.proj.fc3.bias is None
    assert "proj.bn2.sets.pgd.running_mean" in keys and "proj.bn3.sets.normal.weight" in keys
    net.train()
    feat = torch.randn(8, 64)
    z = net.project(feat, "pgd")
    assert z.shape == (8, 64)
    assert torch.all(net.proj.bn1.sets["normal"].running_mean == 0)  # only the pgd set moved
    assert not torch.all(net.proj.bn1.sets["pgd"].running_mean == 0)
    by_hand = net.proj.bn3.sets["pgd"](net.proj.fc3(torch.relu(net.proj.bn2.sets["pgd"](net.proj.fc2(
        torch.relu(net.proj.bn1.sets["pgd"](net.proj.fc1(feat))))))))
    torch.testing.assert_close(net.project(feat, "pgd"), by_hand)


def test_backbone_with_several_bn_sets_keeps_them_in_order():
    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=8)
    enc.train()
    enc.features(torch.rand(8, 3, 32, 32), bn="pgd")
    two = backbone_with_bn_set(enc, ("normal", "pgd"), num_classes=3)
    assert two.config.bn_sets == ("normal", "pgd") and two.proj is None
    enc.eval(), two.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(two.features(x, "pgd"), enc.features(x, "pgd"))


def test_new_model_fields_round_trip_and_are_checked():
    cfg = ModelConfig("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=512, proj_head="mlp3",
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    for field, bad in [("proj_head", "mlp9"), ("mean", [0.5, 0.5]), ("std", [1, 0, 1]), ("mean", "imagenet")]:
        with pytest.raises(CheckpointError, match=f"bad model field '{field}'"):
            ModelConfig.from_dict({**cfg.to_dict(), field: bad})
    with pytest.raises(CheckpointError, match="both mean and std"):
        ModelConfig.from_dict({**cfg.to_dict(), "std": None})
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("proj_head", "mean", "std")}  # a file of the first version
    assert ModelConfig.from_dict(old).proj_head == "mlp2" and ModelConfig.from_dict(old).mean is None


def test_the_stem_padding_is_a_model_field():
    """solo-learn's CIFAR stem (the DeACL authors' model) pads its 3x3 conv by 2: 34x34 maps."""
    torch.manual_seed(0)
    one, two = create_model("resnet18-tiny"), create_model("resnet18-tiny", stem_padding=2)
    two.load_state_dict(one.state_dict())  # the same tensors: only the function differs
    one.eval(), two.eval()
    x = torch.rand(2, 3, 32, 32)
    assert one.backbone.conv1(x).shape[-1] == 32 and two.backbone.conv1(x).shape[-1] == 34
    assert not torch.allclose(one.features(x), two.features(x))
    cfg = two.config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["stem_padding"] == 2
    old = {k: v for k, v in cfg.to_dict().items() if k != "stem_padding"}  # a file written before the field
    assert ModelConfig.from_dict(old).stem_padding == 1
    for bad in (3, True, 2.0, "2"):
        with pytest.raises(CheckpointError, match="bad model field 'stem_padding'"):
            ModelConfig.from_dict({**cfg.to_dict(), "stem_padding": bad})
    with pytest.raises(CheckpointError, match="unknown stem padding 0"):
        ModelConfig("resnet18-tiny", stem_padding=0)
    assert backbone_with_bn_set(two, "normal", num_classes=3).config.stem_padding == 2  # finetuning keeps it


@pytest.mark.parametrize("config", [
    dict(bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=128, pseudo_ks=(2, 10, 50, 100, 500)),  # AdvCL's
    dict(bn_sets=("normal", "pgd"), proj_dim=512, proj_head="mlp3", mean=IMAGENET_MEAN, std=IMAGENET_STD),  # ACL's
    dict(stem_padding=2, num_classes=10),  # solo-learn's (DeACL's SimCLR teacher and student)
], ids=["advcl", "acl", "solo-learn"])
def test_a_fresh_model_is_initialised_as_the_authors_do(config):
    """Every conv: kaiming_normal_(fan_out, relu), std sqrt(2 / (out x kh x kw)), except
    solo-learn's stem (swapped in after torchvision's init: PyTorch's default, uniform with std
    1 / sqrt(3 fan_in)); BN 1 and 0; Linear layers PyTorch's default (std 1 / sqrt(3 fan_in))."""
    torch.manual_seed(0)
    net = create_model("resnet18", **config)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) == 20
    for name, m in [*convs.items(), *((n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear))]:
        w = m.weight.detach().double()
        out, fan_in = w.shape[0], w[0].numel()
        default = isinstance(m, torch.nn.Linear) or (name == "backbone.conv1" and config.get("stem_padding") == 2)
        want = (1 / (3 * fan_in)) ** 0.5 if default else (2 / (out * w[0, 0].numel())) ** 0.5
        tol = 6 / (2 * w.numel()) ** 0.5  # six standard errors of a sample std
        assert abs(w.std().item() / want - 1) < tol, (name, w.std().item(), want)
        assert abs(w.mean().item()) < 6 * want / w.numel() ** 0.5, name
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
