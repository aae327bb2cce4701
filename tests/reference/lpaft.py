"""One step of each phase of DynACL++'s post-processing the way the authors' ``LPAFT.py``
computes it (PKU-ML/DYNACL, with ``trades_loss`` of its ``utils.py``).

Written from the facts of that code, in its structure, sharing nothing with ``advcl_cli`` but
the pretrained network it is handed (``encoder.backbone(x, bn)``):

- the network (``cvt_state_dict`` with ``bnNameCnt`` 1 into a plain ResNet-18): the "pgd" route
  of the pretrained backbone, the ImageNet normalisation in front (float32 buffers, as
  ``NormalizeByChannelMeanStd``), the projection head dropped and ``fc = Linear(512, classes)``
  with zero weight and bias;
- ``train_head``: ``model.eval()``, cross-entropy (batch mean) of ``model(inputs)``, an SGD step of
  ``optimizer_head = SGD(model.fc.parameters(), lr=0.01, weight_decay=1e-4, momentum=0.9)``;
- ``train``: ``trades_loss(model, x, y, optimizer, perturb_steps=10)`` with step 2/255, eps
  8/255, beta 6: ``model.eval()``, ``x_adv = x_natural.detach()`` (no random start), 10 steps of
  ``KLDivLoss(size_average=False)(log_softmax(model(x_adv)), softmax(model(x_natural)))``,
  each a signed step, projected onto the eps-ball and clamped to [0, 1]; then ``model.train()``,
  ``CE(model(x_natural), y) + beta / B * KL_sum(log_softmax(model(x_adv)), softmax(logits))``,
  and an SGD step of ``SGD(model.parameters(), lr=0.1, weight_decay=1e-4, momentum=0.9)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class PGDRoute(nn.Module):
    """The authors' single-BN ResNet: the "pgd" route of ``encoder`` with a new, zero ``fc``."""

    def __init__(self, encoder, classes: int, route: str = "pgd"):
        super().__init__()
        self.encoder, self.route = encoder, route
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        width = encoder.backbone.out_dim
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()

    def forward(self, x):
        x = x.sub(self.mean.to(x.dtype)).div(self.std.to(x.dtype))
        return self.fc(self.encoder.backbone(x, self.route))



def ascend(loss_of, x_natural, x_adv, step_size, epsilon, perturb_steps):
    """The benchmark's TRADES-style loop: signed steps on ``loss_of(x_adv)``, min/max onto the
    eps-ball around ``x_natural``, clamp to [0, 1]; clamped once more at the end."""
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = loss_of(x_adv)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return torch.clamp(x_adv, 0.0, 1.0).detach()

def train_head_step(model, inputs, targets):
    """One iteration of ``train_head``; returns the loss."""
    model.eval()
    optimizer_head = torch.optim.SGD(model.fc.parameters(), lr=0.01, weight_decay=1e-4, momentum=0.9)
    outputs = model.eval()(inputs)
    loss = nn.CrossEntropyLoss()(outputs, targets)
    optimizer_head.zero_grad()
    loss.backward()
    optimizer_head.step()
    return loss


def trades_loss(model, x_natural, y, step_size=2 / 255, epsilon=8 / 255, perturb_steps=10, beta=6.0):
    batch_size = len(x_natural)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = ascend(lambda z: criterion_kl(F.log_softmax(model.eval()(z), dim=1), F.softmax(model(x_natural), dim=1)),
                   x_natural, x_natural.detach(), step_size, epsilon, perturb_steps)
    model.train()
    logits = model(x_natural)
    loss = F.cross_entropy(logits, y)
    logits_adv = model(x_adv)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
    return loss + beta * loss_robust, x_adv


def train_step(model, inputs, targets):
    """One iteration of ``train``; returns the loss and the adversarial images."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4, momentum=0.9)
    loss, x_adv = trades_loss(model, inputs, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, x_adv
