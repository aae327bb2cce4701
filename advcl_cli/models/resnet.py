"""The paper's CIFAR ResNet-18 with named batch-norm sets, and the heads around it.

The backbone is the CIFAR variant (3x3 stride-1 stem, no max-pool) that AdvCL uses. Every BN
layer of the backbone holds one BatchNorm per named set ("normal", "pgd", "pgd_ce" for AdvCL);
the set is chosen per forward call, so clean and adversarial views keep separate statistics
while sharing every convolution. Inputs are [0, 1] pixels; AdvCL uses no normalisation layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

# name -> (stem width, blocks per stage)
ARCHS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet18": (64, (2, 2, 2, 2)),
    "resnet18-tiny": (8, (2, 2, 2, 2)),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    arch: str = "resnet18"
    bn_sets: tuple[str, ...] = ("normal",)
    proj_dim: int | None = None  # projection head output (128 for contrastive methods)
    pseudo_ks: tuple[int, ...] = ()  # one linear head per k (AdvCL: 2, 10, 50, 100, 500)
    num_classes: int | None = None  # linear classifier head

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise CheckpointError(
                f"unknown architecture '{self.arch}'", f"choose one of: {', '.join(ARCHS)}"
            )
        if not self.bn_sets:
            raise CheckpointError("a model needs at least one batch-norm set")
        object.__setattr__(self, "bn_sets", tuple(self.bn_sets))
        object.__setattr__(self, "pseudo_ks", tuple(int(k) for k in self.pseudo_ks))

    @property
    def feature_dim(self) -> int:
        return ARCHS[self.arch][0] * 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bn_sets"], d["pseudo_ks"] = list(self.bn_sets), list(self.pseudo_ks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From ``to_dict``'s output (a checkpoint's metadata): a CheckpointError names the
        first unknown field or value of the wrong type."""
        if not isinstance(d, dict):
            raise CheckpointError(f"the model description is a {type(d).__name__}, not a table")
        extra = set(d) - set(cls.__dataclass_fields__)
        if extra:
            raise CheckpointError(f"unknown model fields: {', '.join(sorted(map(str, extra)))}")
        for key, value in d.items():
            if not _FIELD_CHECKS[key][0](value):
                raise CheckpointError(f"bad model field '{key}': {value!r:.60} is not {_FIELD_CHECKS[key][1]}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


_FIELD_CHECKS = {  # ModelConfig field -> (test, what it should be)
    "arch": (lambda v: isinstance(v, str), "a name"),
    "bn_sets": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v), "a list of names"),
    "proj_dim": (lambda v: v is None or _count(v), "null or a positive integer"),
    "pseudo_ks": (lambda v: isinstance(v, (list, tuple)) and all(_count(k) for k in v), "a list of positive integers"),
    "num_classes": (lambda v: v is None or _count(v), "null or a positive integer"),
}


class MultiBatchNorm2d(nn.Module):
    """One BatchNorm2d per named set; ``forward(x, bn)`` uses set ``bn``."""

    def __init__(self, channels: int, sets: tuple[str, ...]):
        super().__init__()
        self.sets = nn.ModuleDict({name: nn.BatchNorm2d(channels) for name in sets})

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        return self.sets[bn](x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, sets: tuple[str, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = MultiBatchNorm2d(cout, sets)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = MultiBatchNorm2d(cout, sets)
        self.shortcut_conv = None
        if stride != 1 or cin != cout:
            self.shortcut_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.shortcut_bn = MultiBatchNorm2d(cout, sets)

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), bn))
        out = self.bn2(self.conv2(out), bn)
        short = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x), bn)
        return F.relu(out + short)


class ResNetBackbone(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem, four stages, global average pool -> feature vector."""

    def __init__(self, width: int, blocks: tuple[int, ...], sets: tuple[str, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = MultiBatchNorm2d(width, sets)
        layers, cin = [], width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            stride = 1 if stage == 0 else 2
            layers.append(
                nn.ModuleList(
                    BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, sets)
                    for i in range(n)
                )
            )
            cin = cout
        self.layers = nn.ModuleList(layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x), bn))
        for stage in self.layers:
            for block in stage:
                x = block(x, bn)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ProjectionHead(nn.Module):
    """Linear(d, d) - BatchNorm1d - ReLU - Linear(d, out), then L2 normalisation."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out)
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(feat), dim=1)


class AdvclNet(nn.Module):
    """Backbone plus optional heads. ``forward(x)`` returns classifier logits when the model
    has a classifier head, else the backbone feature; ``features``, ``project`` and
    ``pseudo_logits`` give the parts the methods need."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        width, blocks = ARCHS[config.arch]
        self.backbone = ResNetBackbone(width, blocks, config.bn_sets)
        d = self.backbone.out_dim
        self.proj = ProjectionHead(d, config.proj_dim) if config.proj_dim else None
        self.pseudo = (
            nn.ModuleDict({f"k{k}": nn.Linear(d, k) for k in config.pseudo_ks})
            if config.pseudo_ks
            else None
        )
        self.fc = nn.Linear(d, config.num_classes) if config.num_classes else None

    @property
    def default_bn(self) -> str:
        return self.config.bn_sets[0]

    def features(self, x: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        return self.backbone(x, bn or self.default_bn)

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        return self.proj(feat)

    def pseudo_logits(self, feat: torch.Tensor) -> list[torch.Tensor]:
        return [head(feat) for head in self.pseudo.values()]

    def forward(self, x: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        feat = self.features(x, bn)
        return self.fc(feat) if self.fc is not None else feat


def create_model(arch: str = "resnet18", **kwargs) -> AdvclNet:
    """Build a model by architecture name; kwargs are ModelConfig fields."""
    return AdvclNet(ModelConfig(arch=arch, **kwargs))


def backbone_with_bn_set(model: AdvclNet, bn: str, **heads) -> AdvclNet:
    """A single-BN-set copy of ``model``'s backbone using set ``bn``, with new ``heads``
    (ModelConfig fields such as num_classes). Used to finetune from the "pgd" set."""
    if bn not in model.config.bn_sets:
        raise CheckpointError(
            f"the encoder has no batch-norm set '{bn}'",
            f"its sets are: {', '.join(model.config.bn_sets)}",
        )
    new = create_model(model.config.arch, bn_sets=(bn,), **heads)
    src = model.backbone.state_dict()
    marker = ".sets."
    keep = {
        k: v
        for k, v in src.items()
        if marker not in k or k.split(marker)[1].split(".")[0] == bn
    }
    new.backbone.load_state_dict(keep, strict=True)
    return new


__all__ = [
    "ARCHS",
    "ModelConfig",
    "AdvclNet",
    "MultiBatchNorm2d",
    "ProjectionHead",
    "create_model",
    "backbone_with_bn_set",
]
