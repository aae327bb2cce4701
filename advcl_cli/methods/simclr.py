"""SimCLR (Chen et al. 2020): two augmented views, NT-Xent, no attack.

The non-robust baseline, and the encoder whose features make ClusterFit pseudo labels for
AdvCL. As in the SupContrast code the AdvCL authors build on, both views go through the
backbone as one concatenated batch (BN statistics over both views) and the loss is the SupCon
loss in its unsupervised form with two views: NT-Xent at ``temperature``, scaled by
``temperature / base_temperature`` like AdvCL's contrastive term (set ``--base-temperature``
equal to ``--temperature`` for the unscaled NT-Xent).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checkpoint import unwrap
from ..data.augment import simclr_view, to_float
from ..distributed import DistContext, all_gather_with_grad, local_slice
from .base import ContrastiveSettings, CosineSettings, Method, TrainSettings
from .losses import supcon_loss


class SimCLR(Method):
    name = "simclr"
    summary = "SimCLR (Chen et al. 2020): the non-robust baseline and the encoder for pseudo labels"

    class Settings(TrainSettings, ContrastiveSettings, CosineSettings):
        pass

    def model_config(self, arch: str) -> dict:
        return {"bn_sets": ("normal",), "proj_dim": 128}

    def step(self, model, batch: Tensor, indices: Tensor, gen: torch.Generator, ctx: DistContext = DistContext()):
        net = unwrap(model)
        x = to_float(batch, next(net.parameters()).dtype)
        # every rank draws the views of the whole global batch and keeps its slice
        views = torch.cat([local_slice(simclr_view(x, gen), ctx), local_slice(simclr_view(x, gen), ctx)])
        z = net.project(net.features(views, "normal"))
        features = all_gather_with_grad(torch.stack(z.chunk(2), dim=1), ctx)
        loss = supcon_loss(features, self.settings.temperature, self.settings.base_temperature)
        return loss, {"contrast": loss.detach()}
