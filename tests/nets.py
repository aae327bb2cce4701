"""Tiny AdvCL networks whose batch-norm sets all differ, so that a view sent through the wrong
set changes the numbers (tests only)."""

import torch
from torch import nn

from advcl_cli.models import create_model

BN_SETS = ("normal", "pgd", "pgd_ce")


def randomise_batch_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm (each BN set of the backbone and the projection head's) its own
    random affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = m.weight.shape
                m.weight.copy_(0.5 + torch.rand(shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(shape, generator=g))
    return model


def acl_net(dtype=torch.float64, seed: int = 0) -> nn.Module:
    """resnet18-tiny as the ACL family builds it: BN sets normal/pgd (randomised), the three-layer
    projection head with a BN per set, ImageNet normalisation; in ``dtype`` and train mode."""
    from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    model = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=64, proj_head="mlp3",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return randomise_batch_norms(model, seed + 1).to(dtype).train()


def advcl_net(ks=(2, 5), dtype=torch.float64, seed: int = 0) -> nn.Module:
    """resnet18-tiny with AdvCL's three BN sets (randomised), a 128-d projection head and one
    pseudo-label head per k, in ``dtype`` and train mode."""
    torch.manual_seed(seed)
    model = create_model("resnet18-tiny", bn_sets=BN_SETS, proj_dim=128, pseudo_ks=tuple(ks))
    return randomise_batch_norms(model, seed + 1).to(dtype).train()
