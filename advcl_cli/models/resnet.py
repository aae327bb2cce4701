"""The model: a CIFAR backbone (``backbones.ARCHS``) with named batch-norm sets, and the heads
around it.

The paper's backbone is the CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool) that AdvCL and the
ACL family use; ResNet-34/50, PreAct-ResNet-18 and WRN-28-10/34-10 are built the same way (see
``backbones``); ``stem_padding`` 2 gives solo-learn's CIFAR stem (the same 3x3 stride-1 conv with
2 pixels of zero padding, so 34x34 maps from 32x32 images), which the DeACL authors' published
encoder has. Every BN layer of the backbone holds one BatchNorm per named set ("normal", "pgd",
"pgd_ce" for AdvCL; "normal", "pgd" for the ACL family); the set is chosen per forward call, so
clean and adversarial views keep separate statistics while sharing every convolution. Inputs
are [0, 1] pixels; a model may normalise them inside (``mean``/``std``: the ACL family uses
ImageNet's, AdvCL none), so every checkpoint takes [0, 1] images.

Projection heads (``proj_head``):

- ``mlp2`` (AdvCL, SimCLR): Linear(d, d) - BatchNorm1d - ReLU - Linear(d, proj_dim), then L2
  normalisation; one BatchNorm shared by every view;
- ``mlp3`` (the ACL family): Linear(d, d) + BN + ReLU, Linear(d, d, no bias) + BN + ReLU,
  Linear(d, proj_dim, no bias) + BN, each BN with the model's BN sets (chosen per call like the
  backbone's); not normalised (the NT-Xent loss normalises);
- ``mlp2-wide`` (RoCL's ``Projector``): Linear(d, 2048) - ReLU - Linear(2048, proj_dim), no BN,
  not normalised.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .backbones import ARCHS, Backbone, MultiBatchNorm2d

@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    arch: str = "resnet18"
    bn_sets: tuple[str, ...] = ("normal",)
    proj_dim: int | None = None  # projection head output (128 for AdvCL/SimCLR, 512 for ACL)
    proj_head: str = "mlp2"  # mlp2 (AdvCL, SimCLR) or mlp3 (the ACL family); see the module's docstring
    pseudo_ks: tuple[int, ...] = ()  # one linear head per k (AdvCL: 2, 10, 50, 100, 500)
    num_classes: int | None = None  # linear classifier head
    mean: tuple[float, ...] | None = None  # input normalisation inside the model (RGB), or none
    std: tuple[float, ...] | None = None
    stem_padding: int = 1  # zero padding of the 3x3 stem conv: 1, or 2 (solo-learn's, the DeACL authors' model)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise CheckpointError(
                f"unknown architecture '{self.arch}'", f"choose one of: {', '.join(ARCHS)}"
            )
        if not self.bn_sets:
            raise CheckpointError("a model needs at least one batch-norm set")
        if self.proj_head not in PROJ_HEADS:
            raise CheckpointError(f"unknown projection head '{self.proj_head}'", f"choose one of: {', '.join(PROJ_HEADS)}")
        if (self.mean is None) != (self.std is None):
            raise CheckpointError("a model's normalisation needs both mean and std")
        if self.stem_padding not in STEM_PADDINGS:
            raise CheckpointError(f"unknown stem padding {self.stem_padding!r}", "advcl's stems pad by 1 or 2")
        object.__setattr__(self, "bn_sets", tuple(self.bn_sets))
        object.__setattr__(self, "pseudo_ks", tuple(int(k) for k in self.pseudo_ks))
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def feature_dim(self) -> int:
        return ARCHS[self.arch].feature_dim

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJ_HEADS = ("mlp2", "mlp3", "mlp2-wide")
STEM_PADDINGS = (1, 2)


def _count(v) -> bool:
    """A size a layer can have: 1 .. 2^31 - 1 (10^20 would reach torch as a C++ overflow)."""
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**31


def _rgb(v) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and len(v) == 3
                         and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in v))


def _bn_name(v) -> bool:
    """A name a BN set can have: a module name (not empty, no '.') that is no attribute of nn.ModuleDict."""
    return isinstance(v, str) and re.fullmatch(r"[\w-]+", v) is not None and not hasattr(nn.ModuleDict(), v)


_FIELD_CHECKS = {  # ModelConfig field -> (test, what it should be)
    "arch": (lambda v: isinstance(v, str), "a name"),
    "bn_sets": (lambda v: isinstance(v, (list, tuple)) and all(_bn_name(s) for s in v) and len(set(v)) == len(v),
                "a list of distinct names of letters, digits, _ and -"),
    "proj_dim": (lambda v: v is None or _count(v), "null or a positive integer below 2^31"),
    "pseudo_ks": (lambda v: isinstance(v, (list, tuple)) and all(_count(k) for k in v), "a list of positive integers below 2^31"),
    "num_classes": (lambda v: v is None or _count(v), "null or a positive integer below 2^31"),
    "proj_head": (lambda v: v in PROJ_HEADS, "one of " + ", ".join(PROJ_HEADS)),
    "mean": (_rgb, "null or three numbers"),
    "std": (lambda v: _rgb(v) and (v is None or all(x > 0 for x in v)), "null or three positive numbers"),
    "stem_padding": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v in STEM_PADDINGS, "1 or 2"),
}


class ProjectionHead(nn.Module):
    """``mlp2``: Linear(d, d) - BatchNorm1d - ReLU - Linear(d, out), then L2 normalisation."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out)
        )

    def forward(self, feat: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        return F.normalize(self.net(feat), dim=1)


class WideProjectionHead(nn.Module):
    """``mlp2-wide``: Linear(d, 2048) - ReLU - Linear(2048, out), not normalised."""

    def __init__(self, dim: int, out: int, hidden: int = 2048):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, feat: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        return self.net(feat)


class MultiBNProjectionHead(nn.Module):
    """``mlp3``: three Linear + BN layers (ReLU between), each BN with the model's BN sets."""

    def __init__(self, dim: int, out: int, sets: tuple[str, ...]):
        super().__init__()
        self.default = sets[0]
        self.fc1, self.bn1 = nn.Linear(dim, dim), MultiBatchNorm2d(dim, sets, nn.BatchNorm1d)
        self.fc2, self.bn2 = nn.Linear(dim, dim, bias=False), MultiBatchNorm2d(dim, sets, nn.BatchNorm1d)
        self.fc3, self.bn3 = nn.Linear(dim, out, bias=False), MultiBatchNorm2d(out, sets, nn.BatchNorm1d)

    def forward(self, feat: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        bn = bn or self.default
        x = F.relu(self.bn1(self.fc1(feat), bn))
        x = F.relu(self.bn2(self.fc2(x), bn))
        return self.bn3(self.fc3(x), bn)


class AdvclNet(nn.Module):
    """Backbone plus optional heads. ``forward(x)`` returns classifier logits when the model
    has a classifier head, else the backbone feature; ``features``, ``project`` and
    ``pseudo_logits`` give the parts the methods need."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(ARCHS[config.arch], config.bn_sets, config.stem_padding)
        d = self.backbone.out_dim
        if config.mean is not None:  # not in the state dict: the config says it. float32 values, as the
            # authors' NormalizeByChannelMeanStd buffers hold (a float64 model casts those values)
            self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.proj = None
        if config.proj_dim:
            if config.proj_head == "mlp3":
                self.proj = MultiBNProjectionHead(d, config.proj_dim, config.bn_sets)
            else:
                self.proj = (WideProjectionHead if config.proj_head == "mlp2-wide" else ProjectionHead)(d, config.proj_dim)
        self.pseudo = (
            nn.ModuleDict({f"k{k}": nn.Linear(d, k) for k in config.pseudo_ks})
            if config.pseudo_ks
            else None
        )
        self.fc = nn.Linear(d, config.num_classes) if config.num_classes else None
        init_as_authors(self)

    @property
    def default_bn(self) -> str:
        return self.config.bn_sets[0]

    def features(self, x: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        """The backbone feature of [0, 1] images (normalised first when the model says so)."""
        if self.config.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x, bn or self.default_bn)

    def project(self, feat: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        """The projection head (``bn`` chooses the set of an ``mlp3`` head; ``mlp2`` has one)."""
        return self.proj(feat, bn)

    def pseudo_logits(self, feat: torch.Tensor) -> list[torch.Tensor]:
        return [head(feat) for head in self.pseudo.values()]

    def forward(self, x: torch.Tensor, bn: str | None = None) -> torch.Tensor:
        feat = self.features(x, bn)
        return self.fc(feat) if self.fc is not None else feat


def init_as_authors(model: "AdvclNet") -> None:
    """The authors' initialisation (AdvCL's ``resnet_cifar_multibn_ensembleFC.py``, the ACL
    family's ``resnet_multi_bn.py``, torchvision's ResNet under solo-learn's SimCLR and DeACL):
    every Conv2d ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` (std sqrt(2 / (out
    channels x kernel area))), every BatchNorm weight 1 and bias 0; Linear layers keep PyTorch's
    default, as theirs do. solo-learn swaps in its CIFAR stem (padding 2) after torchvision's
    init, so a model with that stem keeps PyTorch's default init in its stem conv, as theirs."""
    solo_stem = model.backbone.conv1 if model.config.stem_padding == 2 else None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m is not solo_stem:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_model(arch: str = "resnet18", **kwargs) -> AdvclNet:
    """Build a model by architecture name; kwargs are ModelConfig fields."""
    return AdvclNet(ModelConfig(arch=arch, **kwargs))


def backbone_with_bn_set(model: AdvclNet, bn: str | tuple[str, ...], **heads) -> AdvclNet:
    """A copy of ``model``'s backbone (and normalisation) keeping only BN set ``bn`` (or the
    sets of a tuple, in that order), with new ``heads`` (ModelConfig fields such as num_classes)
    and none of the pretraining heads. Used to finetune from the "pgd" set."""
    keep = (bn,) if isinstance(bn, str) else tuple(bn)
    missing = [name for name in keep if name not in model.config.bn_sets]
    if missing:
        raise CheckpointError(
            f"the encoder has no batch-norm set '{missing[0]}'",
            f"its sets are: {', '.join(model.config.bn_sets)}",
        )
    fields = dict(bn_sets=keep, proj_dim=None, proj_head="mlp2", pseudo_ks=(), num_classes=None)
    new = AdvclNet(replace(model.config, **{**fields, **heads}))
    marker = ".sets."
    state = {
        k: v
        for k, v in model.backbone.state_dict().items()
        if marker not in k or k.split(marker)[1].split(".")[0] in keep
    }
    new.backbone.load_state_dict(state, strict=True)
    return new


__all__ = [
    "ARCHS",
    "ModelConfig",
    "AdvclNet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiBatchNorm2d",
    "MultiBNProjectionHead",
    "ProjectionHead",
    "create_model",
    "backbone_with_bn_set",
]
