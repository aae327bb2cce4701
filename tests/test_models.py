import pytest
import torch

from advcl_cli.errors import CheckpointError
from advcl_cli.models import ModelConfig, backbone_with_bn_set, create_model


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
