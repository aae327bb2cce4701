"""The CIFAR backbones: ResNet-18/34/50, PreAct-ResNet-18 and WideResNet-28-10/34-10, each with
named BN sets (``MultiBatchNorm2d``, the set chosen per forward call) and a 3x3 stride-1 stem
(padding 1, or 2 as solo-learn's) with no max-pool, so 32x32 images keep 32x32 maps in the
first stage.

- ``basic`` / ``bottleneck`` (ResNet-18/34 and ResNet-50, the CIFAR variant of RobustBench's and
  kuangliu's ``resnet.py``; torchvision's Bottleneck: stride on the 3x3 conv, 4x expansion):
  stem conv - ``bn1`` - ReLU, four post-activation stages, average pool;
- ``preact`` (PreAct-ResNet-18 of He et al. 2016 as in Rice et al.'s robust-overfitting code,
  and RobustBench's WideResNet of TRADES): stem conv without BN, pre-activation blocks whose
  projection shortcut (a 1x1 conv, no BN) takes the block's activated input, then ``bn1`` - ReLU
  before the average pool. A WideResNet-d-k has three stages of (d - 4) / 6 blocks of widths
  16k, 32k, 64k after a 16-channel stem (RobustBench's unused ``sub_block1`` is left out).

Every arch has a slim ``-tiny`` width for tests with the same depth and tensor names: width 8
for the ResNets (as ``resnet18-tiny``); for the WideResNets widen factor 1 (stages of 16, 32, 64)
after an 8-channel stem, so the first block keeps its projection shortcut as at full width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Arch:
    """One architecture: the block kind, the stem's width, each stage's width (planes) and
    number of blocks; the first stage has stride 1, each later one stride 2."""

    block: str  # basic | bottleneck | preact
    stem: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * BLOCKS[self.block].expansion


def _resnet(block: str, width: int, blocks: tuple[int, ...]) -> Arch:
    return Arch(block, width, tuple(width * 2**s for s in range(4)), blocks)


def _wrn(depth: int, k: int, stem: int = 16) -> Arch:
    n = (depth - 4) // 6
    return Arch("preact", stem, (16 * k, 32 * k, 64 * k), (n, n, n))


ARCHS: dict[str, Arch] = {
    "resnet18": _resnet("basic", 64, (2, 2, 2, 2)),
    "resnet18-tiny": _resnet("basic", 8, (2, 2, 2, 2)),
    "resnet34": _resnet("basic", 64, (3, 4, 6, 3)),
    "resnet34-tiny": _resnet("basic", 8, (3, 4, 6, 3)),
    "resnet50": _resnet("bottleneck", 64, (3, 4, 6, 3)),
    "resnet50-tiny": _resnet("bottleneck", 8, (3, 4, 6, 3)),
    "preact-resnet18": _resnet("preact", 64, (2, 2, 2, 2)),
    "preact-resnet18-tiny": _resnet("preact", 8, (2, 2, 2, 2)),
    "wrn-28-10": _wrn(28, 10),
    "wrn-28-10-tiny": _wrn(28, 1, stem=8),
    "wrn-34-10": _wrn(34, 10),
    "wrn-34-10-tiny": _wrn(34, 1, stem=8),
}


class MultiBatchNorm2d(nn.Module):
    """One BatchNorm2d (or 1d) per named set; ``forward(x, bn)`` uses set ``bn``."""

    def __init__(self, channels: int, sets: tuple[str, ...], norm=nn.BatchNorm2d):
        super().__init__()
        self.sets = nn.ModuleDict({name: norm(channels) for name in sets})

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        return self.sets[bn](x)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class _PostActBlock(nn.Module):
    """What the post-activation blocks share: a 1x1 projection shortcut with its BN when the
    shape changes, and the final ReLU of the sum."""

    def _shortcut(self, cin: int, cout: int, stride: int, sets: tuple[str, ...]) -> None:
        self.shortcut_conv = None
        if stride != 1 or cin != cout:
            self.shortcut_conv, self.shortcut_bn = _conv(cin, cout, 1, stride), MultiBatchNorm2d(cout, sets)

    def _join(self, out: torch.Tensor, x: torch.Tensor, bn: str) -> torch.Tensor:
        short = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x), bn)
        return F.relu(out + short)


class BasicBlock(_PostActBlock):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, sets: tuple[str, ...]):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), MultiBatchNorm2d(planes, sets)
        self.conv2, self.bn2 = _conv(planes, planes, 3), MultiBatchNorm2d(planes, sets)
        self._shortcut(cin, planes, stride, sets)

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), bn))
        return self._join(self.bn2(self.conv2(out), bn), x, bn)


class Bottleneck(_PostActBlock):
    """1x1 - 3x3 (the stride) - 1x1 to 4x the planes, post-activation, BN on the projection."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, sets: tuple[str, ...]):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv(cin, planes, 1), MultiBatchNorm2d(planes, sets)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), MultiBatchNorm2d(planes, sets)
        self.conv3, self.bn3 = _conv(planes, cout, 1), MultiBatchNorm2d(cout, sets)
        self._shortcut(cin, cout, stride, sets)

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), bn))
        out = F.relu(self.bn2(self.conv2(out), bn))
        return self._join(self.bn3(self.conv3(out), bn), x, bn)


class PreActBlock(nn.Module):
    """BN - ReLU - conv3x3 (the stride) - BN - ReLU - conv3x3, plus the input (or a 1x1
    projection of the activated input when the shape changes): PreAct-ResNet's and WRN's block."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, sets: tuple[str, ...]):
        super().__init__()
        self.bn1, self.conv1 = MultiBatchNorm2d(cin, sets), _conv(cin, planes, 3, stride)
        self.bn2, self.conv2 = MultiBatchNorm2d(planes, sets), _conv(planes, planes, 3)
        self.shortcut_conv = _conv(cin, planes, 1, stride) if stride != 1 or cin != planes else None

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        out = F.relu(self.bn1(x, bn))
        short = x if self.shortcut_conv is None else self.shortcut_conv(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out, bn))) + short


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact": PreActBlock}


class Backbone(nn.Module):
    """Stem conv, the stages, global average pool -> feature vector. ``bn1`` follows the stem
    in a post-activation ResNet and precedes the pool in a pre-activation one."""

    def __init__(self, arch: Arch, sets: tuple[str, ...], stem_padding: int = 1):
        super().__init__()
        block = BLOCKS[arch.block]
        self.preact = arch.block == "preact"
        self.conv1 = nn.Conv2d(3, arch.stem, 3, 1, stem_padding, bias=False)
        if not self.preact:
            self.bn1 = MultiBatchNorm2d(arch.stem, sets)
        layers, cin = [], arch.stem
        for stage, (planes, n) in enumerate(zip(arch.widths, arch.blocks)):
            stride = 1 if stage == 0 else 2
            layers.append(nn.ModuleList(block(cin if i == 0 else planes * block.expansion, planes,
                                              stride if i == 0 else 1, sets) for i in range(n)))
            cin = planes * block.expansion
        self.layers = nn.ModuleList(layers)
        if self.preact:
            self.bn1 = MultiBatchNorm2d(cin, sets)
        self.out_dim = cin

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = F.relu(self.bn1(x, bn))
        for stage in self.layers:
            for block in stage:
                x = block(x, bn)
        if self.preact:
            x = F.relu(self.bn1(x, bn))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
