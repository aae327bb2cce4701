"""Loss functions of the pretraining methods, as pure functions of tensors.

``supcon_loss`` is the SupCon loss (Khosla et al. 2020) in its unsupervised form, the one the
AdvCL code uses through ``SupConLoss(temperature=0.5)``: every one of the ``B * V`` vectors is an
anchor, its positives are the other ``V - 1`` views of the same image, its denominator runs over
all ``B * V - 1`` other vectors, and the mean over anchors is scaled by
``temperature / base_temperature`` (0.5 / 0.07 with SupConLoss's default base temperature).
With two views and ``base_temperature == temperature`` it is SimCLR's NT-Xent.

``nt_xent`` is the ACL family's contrastive loss: ``supcon_loss`` with two views, unscaled,
on projections it normalises itself.

``pseudo_label_ce`` is AdvCL's pseudo-supervision term: the mean over the ClusterFit heads of the
cross-entropy, with ``-1`` labels ignored (``reduction="sum"`` inside the attack, ``"mean"`` in
the training loss, as in the reference).

Both compute in the inputs' precision (float64 stays float64); half precisions from bf16
autocast are upcast to float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.device import upcast


def supcon_loss(features: Tensor, temperature: float = 0.5, base_temperature: float = 0.07) -> Tensor:
    """Unsupervised SupCon loss of ``features`` (B, V, D), L2-normalised along D."""
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, views, dim), got shape {tuple(features.shape)}")
    b, v, _ = features.shape
    z = upcast(features.transpose(0, 1).reshape(b * v, -1))  # view-major: [view0 of all; view1 of all; ...]
    logits = z @ z.T / temperature
    eye = torch.eye(b * v, dtype=torch.bool, device=z.device)
    log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    image = torch.arange(b, device=z.device).repeat(v)
    positive = (image[:, None] == image[None, :]) & ~eye
    mean_log_prob_pos = (log_prob * positive).sum(1) / (v - 1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def nt_xent(features: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR's loss) of view pairs ``features`` (B, 2, D), normalised here: each of the
    2B vectors is an anchor, its positive the other view of its image, its denominator the
    2B - 1 others (the ACL family's ``nt_xent``; ``supcon_loss`` with two views, unscaled)."""
    return supcon_loss(F.normalize(upcast(features), dim=-1), temperature, temperature)


def pseudo_label_ce(logits: list[Tensor], targets: list[Tensor], reduction: str = "mean") -> Tensor:
    """Mean over heads of the cross-entropy of each head's logits against its labels."""
    if len(logits) != len(targets) or not logits:
        raise ValueError(f"{len(logits)} heads but {len(targets)} label sets")
    total = sum(
        F.cross_entropy(upcast(lg), t, ignore_index=-1, reduction=reduction) for lg, t in zip(logits, targets)
    )
    return total / len(logits)
