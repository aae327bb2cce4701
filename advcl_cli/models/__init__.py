"""Models: the CIFAR ResNet-18 with named BN sets and its heads."""

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
