"""Models: the CIFAR backbones (ResNet-18/34/50, PreAct-ResNet-18, WRN-28-10/34-10) with named BN sets and their heads."""

from .resnet import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdvclNet,
    ModelConfig,
    MultiBatchNorm2d,
    ProjectionHead,
    backbone_with_bn_set,
    create_model,
)

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AdvclNet",
    "ModelConfig",
    "MultiBatchNorm2d",
    "ProjectionHead",
    "backbone_with_bn_set",
    "create_model",
]
