"""Tiny AdvCL and ACL-family networks whose batch-norm sets all differ, so that a view sent
through the wrong set (or the wrong network) changes the numbers (tests only)."""

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


def perturb(net: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Move every weight by ``scale`` x its spread x N(0, 1) and redraw the BN sets: a network
    other than the trained one (a momentum encoder mid-training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * (p.std() if p.numel() > 1 else 1.0) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return randomise_batch_norms(net, seed)


def acl_family_net(method, seed: int = 0) -> nn.Module:
    """resnet18-tiny as an ACL-family ``method`` builds it (BN sets normal/pgd, the three-layer
    head, ImageNet normalisation), handed to ``method.init_model``, then every BN set
    randomised, float64, train mode; a momentum encoder the method made (DynACL) is moved away
    from it."""
    torch.manual_seed(seed)
    net = create_model("resnet18-tiny", **method.model_config("resnet18-tiny"))
    method.init_model(net)
    randomise_batch_norms(net, seed + 1).double().train()
    if getattr(method, "momentum_net", None) is not None:
        method.momentum_net = perturb(method.momentum_net, seed + 2).double()
    return net


def advcl_net(ks=(2, 5), dtype=torch.float64, seed: int = 0) -> nn.Module:
    """resnet18-tiny with AdvCL's three BN sets (randomised), a 128-d projection head and one
    pseudo-label head per k, in ``dtype`` and train mode."""
    torch.manual_seed(seed)
    model = create_model("resnet18-tiny", bn_sets=BN_SETS, proj_dim=128, pseudo_ks=tuple(ks))
    return randomise_batch_norms(model, seed + 1).to(dtype).train()
