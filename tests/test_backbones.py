"""The backbones beyond ResNet-18: PreAct-ResNet-18, ResNet-34/50, WRN-28-10/34-10 and their
slim test widths. Full widths are checked against the published implementations' layer shapes
(one forward each); the tiny widths go through the CLI (pretrain, finetune, eval)."""

import json
import re

import pytest
import torch

from advcl_cli.checkpoint import load_checkpoint
from advcl_cli.errors import CheckpointError
from advcl_cli.importer import import_original
from advcl_cli.models import ModelConfig, backbone_with_bn_set, create_model

NEW = ["preact-resnet18", "resnet34", "resnet50", "wrn-28-10", "wrn-34-10"]


def _bn(name: str) -> str:
    return f"{name}.sets.normal.weight"


# What the published implementations build with 10 classes, written from their code:
# RobustBench's model_zoo/architectures/resnet.py (kuangliu's CIFAR ResNet: ResNet34 =
# ResNet(BasicBlock, [3, 4, 6, 3]), ResNet50 = ResNet(Bottleneck, [3, 4, 6, 3]), 3x3 stem, no
# max-pool; PreActResNet18 = PreActResNet(PreActBlock, [2, 2, 2, 2]) with the bn before the fc, as
# Rice et al.'s), and RobustBench's wide_resnet.py (TRADES' WideResNet(depth, widen_factor=10),
# without the unused sub_block1). Per arch: the parameter count, the number of convs, each
# stage's output (channels, side) on 32x32 images, and named layers: theirs -> (ours, shape).
PUBLISHED = {
    "resnet34": (21_282_122, 36, [(64, 32), (128, 16), (256, 8), (512, 4)], {
        "conv1.weight": ("backbone.conv1.weight", (64, 3, 3, 3)),
        "bn1.weight": (_bn("backbone.bn1"), (64,)),
        "layer1.2.conv2.weight": ("backbone.layers.0.2.conv2.weight", (64, 64, 3, 3)),
        "layer2.0.conv1.weight": ("backbone.layers.1.0.conv1.weight", (128, 64, 3, 3)),
        "layer2.0.shortcut.0.weight": ("backbone.layers.1.0.shortcut_conv.weight", (128, 64, 1, 1)),
        "layer2.0.shortcut.1.weight": (_bn("backbone.layers.1.0.shortcut_bn"), (128,)),
        "layer2.3.conv2.weight": ("backbone.layers.1.3.conv2.weight", (128, 128, 3, 3)),
        "layer3.5.conv2.weight": ("backbone.layers.2.5.conv2.weight", (256, 256, 3, 3)),
        "layer4.2.bn2.weight": (_bn("backbone.layers.3.2.bn2"), (512,)),
        "linear.weight": ("fc.weight", (10, 512)),
    }),
    "resnet50": (23_520_842, 53, [(256, 32), (512, 16), (1024, 8), (2048, 4)], {
        "conv1.weight": ("backbone.conv1.weight", (64, 3, 3, 3)),
        "layer1.0.conv1.weight": ("backbone.layers.0.0.conv1.weight", (64, 64, 1, 1)),
        "layer1.0.conv2.weight": ("backbone.layers.0.0.conv2.weight", (64, 64, 3, 3)),
        "layer1.0.conv3.weight": ("backbone.layers.0.0.conv3.weight", (256, 64, 1, 1)),
        "layer1.0.bn3.weight": (_bn("backbone.layers.0.0.bn3"), (256,)),
        "layer1.0.shortcut.0.weight": ("backbone.layers.0.0.shortcut_conv.weight", (256, 64, 1, 1)),
        "layer1.1.conv1.weight": ("backbone.layers.0.1.conv1.weight", (64, 256, 1, 1)),
        "layer2.0.conv1.weight": ("backbone.layers.1.0.conv1.weight", (128, 256, 1, 1)),
        "layer2.0.shortcut.0.weight": ("backbone.layers.1.0.shortcut_conv.weight", (512, 256, 1, 1)),
        "layer3.5.conv3.weight": ("backbone.layers.2.5.conv3.weight", (1024, 256, 1, 1)),
        "layer4.2.conv2.weight": ("backbone.layers.3.2.conv2.weight", (512, 512, 3, 3)),
        "linear.weight": ("fc.weight", (10, 2048)),
    }),
    "preact-resnet18": (11_172_170, 20, [(64, 32), (128, 16), (256, 8), (512, 4)], {
        "conv1.weight": ("backbone.conv1.weight", (64, 3, 3, 3)),
        "layer1.0.bn1.weight": (_bn("backbone.layers.0.0.bn1"), (64,)),
        "layer2.0.bn1.weight": (_bn("backbone.layers.1.0.bn1"), (64,)),
        "layer2.0.conv1.weight": ("backbone.layers.1.0.conv1.weight", (128, 64, 3, 3)),
        "layer2.0.shortcut.0.weight": ("backbone.layers.1.0.shortcut_conv.weight", (128, 64, 1, 1)),
        "layer4.1.conv2.weight": ("backbone.layers.3.1.conv2.weight", (512, 512, 3, 3)),
        "bn.weight": (_bn("backbone.bn1"), (512,)),
        "linear.weight": ("fc.weight", (10, 512)),
    }),
    "wrn-28-10": (36_479_194, 28, [(160, 32), (320, 16), (640, 8)], {
        "conv1.weight": ("backbone.conv1.weight", (16, 3, 3, 3)),
        "block1.layer.0.bn1.weight": (_bn("backbone.layers.0.0.bn1"), (16,)),
        "block1.layer.0.conv1.weight": ("backbone.layers.0.0.conv1.weight", (160, 16, 3, 3)),
        "block1.layer.0.convShortcut.weight": ("backbone.layers.0.0.shortcut_conv.weight", (160, 16, 1, 1)),
        "block1.layer.3.conv2.weight": ("backbone.layers.0.3.conv2.weight", (160, 160, 3, 3)),
        "block2.layer.0.conv1.weight": ("backbone.layers.1.0.conv1.weight", (320, 160, 3, 3)),
        "block2.layer.0.convShortcut.weight": ("backbone.layers.1.0.shortcut_conv.weight", (320, 160, 1, 1)),
        "block3.layer.3.bn2.weight": (_bn("backbone.layers.2.3.bn2"), (640,)),
        "bn1.weight": (_bn("backbone.bn1"), (640,)),
        "fc.weight": ("fc.weight", (10, 640)),
    }),
    "wrn-34-10": (46_160_474, 34, [(160, 32), (320, 16), (640, 8)], {
        "conv1.weight": ("backbone.conv1.weight", (16, 3, 3, 3)),
        "block1.layer.0.conv1.weight": ("backbone.layers.0.0.conv1.weight", (160, 16, 3, 3)),
        "block1.layer.4.conv2.weight": ("backbone.layers.0.4.conv2.weight", (160, 160, 3, 3)),
        "block2.layer.0.convShortcut.weight": ("backbone.layers.1.0.shortcut_conv.weight", (320, 160, 1, 1)),
        "block3.layer.0.conv1.weight": ("backbone.layers.2.0.conv1.weight", (640, 320, 3, 3)),
        "block3.layer.4.conv2.weight": ("backbone.layers.2.4.conv2.weight", (640, 640, 3, 3)),
        "bn1.weight": (_bn("backbone.bn1"), (640,)),
        "fc.weight": ("fc.weight", (10, 640)),
    }),
}


@pytest.mark.parametrize("arch", NEW)
def test_the_full_width_matches_the_published_layer_shapes(arch):
    params, convs, stages, layers = PUBLISHED[arch]
    net = create_model(arch, num_classes=10).eval()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for theirs, (ours, shape) in layers.items():
        assert shapes.get(ours) == shape, (theirs, ours, shapes.get(ours), shape)
    assert sum(p.numel() for p in net.parameters()) == params
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    seen = []
    hooks = [stage[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
             for stage in net.backbone.layers]
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert seen == [(c, s, s) for c, s in stages]
    assert net.config.feature_dim == stages[-1][0]


def test_the_preact_shortcut_projects_the_activated_input():
    """He et al.'s pre-activation block (and WRN's): the 1x1 projection reads ReLU(BN(x)), so with
    the residual branch zeroed the block computes exactly that."""
    torch.manual_seed(0)
    net = create_model("wrn-28-10-tiny").eval()
    block = net.backbone.layers[1][0]  # 16 -> 32 channels, stride 2
    with torch.no_grad():
        block.conv2.weight.zero_()
        bn = block.bn1.sets["normal"]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        x = torch.randn(2, 16, 8, 8)
        want = block.shortcut_conv(torch.relu(bn(x)))
        torch.testing.assert_close(block(x, "normal"), want)


def test_the_bottleneck_strides_on_its_3x3_conv():
    """torchvision's (and RobustBench's CIFAR) Bottleneck: the 1x1 conv keeps the input's size,
    the 3x3 halves it (the original ResNet strides the first 1x1; the shapes cannot tell)."""
    net = create_model("resnet50-tiny")
    block, sides = net.backbone.layers[1][0], {}
    for name in ("conv1", "conv2", "conv3"):
        getattr(block, name).register_forward_hook(lambda m, i, o, name=name: sides.update({name: o.shape[-1]}))
    net.features(torch.rand(1, 3, 32, 32))
    assert sides == {"conv1": 32, "conv2": 16, "conv3": 16}


@pytest.mark.parametrize("arch", NEW)
def test_the_tiny_width_has_the_full_widths_topology(arch):
    big, tiny = create_model(arch), create_model(f"{arch}-tiny")
    assert list(big.state_dict()) == list(tiny.state_dict())
    assert tiny.features(torch.rand(2, 3, 32, 32)).shape == (2, tiny.config.feature_dim)


@pytest.mark.parametrize("arch", [f"{a}-tiny" for a in NEW])
def test_bn_sets_heads_stem_and_config_work_on_every_arch(arch):
    torch.manual_seed(0)
    cfg = dict(bn_sets=("normal", "pgd"), proj_dim=32, proj_head="mlp3", pseudo_ks=(2, 5), stem_padding=2,
               mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    net = create_model(arch, **cfg).train()
    d = net.config.feature_dim
    feat = net.features(torch.rand(8, 3, 32, 32) * 3, bn="pgd")
    assert feat.shape == (8, d) and net.project(feat, "pgd").shape == (8, 32)
    assert [t.shape[1] for t in net.pseudo_logits(feat)] == [2, 5]
    means = {n: t for n, t in net.state_dict().items() if n.endswith("running_mean") and n.startswith("backbone.")}
    assert means and all(torch.all(t == 0) for n, t in means.items() if ".sets.normal." in n)
    assert all(not torch.all(t == 0) for n, t in means.items() if ".sets.pgd." in n)
    assert net.backbone.conv1(torch.rand(1, 3, 32, 32)).shape[-1] == 34
    assert ModelConfig.from_dict(net.config.to_dict()) == net.config
    clf = backbone_with_bn_set(net, "pgd", num_classes=3).eval()
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clf.features(x), net.features(x, "pgd"))
    assert clf(x).shape == (2, 3)


@pytest.mark.parametrize("arch", [f"{a}-tiny" for a in NEW])
def test_every_arch_is_initialised_as_the_authors_do(arch):
    """kaiming_normal_(fan_out, relu) in every conv (1x1 shortcuts and bottlenecks too), BN 1/0."""
    torch.manual_seed(0)
    net = create_model(arch, num_classes=10)
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight.detach().double()
            want = (2 / (w.shape[0] * w[0, 0].numel())) ** 0.5
            assert abs(w.std().item() / want - 1) < 6 / (2 * w.numel()) ** 0.5, (name, w.std().item(), want)
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_no_new_arch_is_importable_and_the_error_says_which_are(tmp_path):
    """No method published a ResNet-34 encoder: an ACL-style file of one is refused in one line."""
    sd = create_model("resnet34-tiny", bn_sets=("normal", "pgd")).state_dict()
    state = {}
    for key, t in sd.items():
        key = re.sub(r"^backbone\.layers\.(\d)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
        key = key.removeprefix("backbone.").replace("shortcut_conv", "downsample.conv").replace("shortcut_bn", "downsample.bn")
        state[key.replace(".sets.normal.", ".bn_list.0.").replace(".sets.pgd.", ".bn_list.1.")] = t
    torch.save({"state_dict": state}, tmp_path / "r34.pt")
    with pytest.raises(CheckpointError, match=r"no importable architecture has stem width 8 and blocks \(3, 4, 6, 3\)") as err:
        import_original(tmp_path / "r34.pt", tmp_path / "r34.safetensors", source="acl")
    assert "resnet18" in err.value.hint and not (tmp_path / "r34.safetensors").exists()


SMALL = ["--dataset", "digits", "--limit", "32", "--batch-size", "16", "--image-size", "16", "--device", "cpu"]


@pytest.mark.parametrize("arch", [f"{a}-tiny" for a in NEW])
def test_every_arch_pretrains_finetunes_and_evaluates_through_the_cli(run_cli, tmp_path, arch):
    encoders = {}
    for method in ("simclr", "acl"):
        extra = ["--pgd-steps", "1"] if method == "acl" else []
        code, out, err = run_cli("pretrain", "--method", method, "--arch", arch, *SMALL, "--epochs", "1", *extra,
                                 "--out", tmp_path / method)
        assert code == 0, err
        encoders[method] = out.strip()
        meta = load_checkpoint(encoders[method]).meta
        assert meta.arch == arch and meta.model["arch"] == arch and meta.method == method
    code, clf, err = run_cli("finetune", encoders["acl"], "--scheme", "slf", "--epochs", "1", *SMALL,
                             "--eval-limit", "8", "--out", tmp_path / "slf")
    assert code == 0, err
    ckpt = load_checkpoint(clf.strip())
    assert ckpt.meta.kind == "classifier" and ckpt.model_config.arch == arch and ckpt.model_config.bn_sets == ("pgd",)
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd20", "--limit", "8", "--image-size", "16", "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 8 and doc["arch"] == arch, doc
    from advcl_cli import load_model

    net = load_model(clf.strip())
    assert net.config.arch == arch and not net.training and net(torch.rand(1, 3, 16, 16)).shape == (1, 10)


def test_the_flop_script_counts_what_the_layers_compute(monkeypatch):
    """benchmarks/backbone_flops.py against a count from each layer's shapes: a conv costs
    2 x out x in x kh x kw x output pixels, a Linear 2 x in x out. The training step's backward
    costs two forwards (weight and input gradients) less the stem's input gradient (the images
    need none); an attack step's backward one forward (every input gradient, the stem's too, and no
    weight gradient)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from backbone_flops import count

    for arch in ["resnet18-tiny", *(f"{a}-tiny" for a in NEW)]:
        net, macs = create_model(arch, num_classes=10), {}

        def hook(m, i, o):
            w = m.weight
            macs[m] = (w.numel() * o.shape[-1] * o.shape[-2]) if isinstance(m, torch.nn.Conv2d) else w.numel()

        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_forward_hook(hook)
        net(torch.rand(1, 3, 32, 32))
        fwd, stem = 2 * sum(macs.values()) / 1e9, 2 * macs[net.backbone.conv1] / 1e9
        params, *gflop = count(arch)
        assert params == sum(p.numel() for p in net.parameters()) / 1e6
        assert gflop == pytest.approx([fwd, 3 * fwd - stem, 2 * fwd], rel=1e-9), arch
