"""One AutoLoRa step the way the RobustSSL benchmark's ``Finetuning_Methods/AutoLoRa`` computes
it (tests only): ``models/LoRA.py``'s ``ConvLoRA`` (``r_nat`` 8, lora_alpha 1: the natural
thread's weight ``conv.weight + (lora_B_nat @ lora_A_nat).view(conv.weight.shape) * (1 / 8)``)
put on every convolution of the blocks of a copy of the classifier, and ``utils.py``'s
``trades_loss_autolora``:

- x_adv from x + 0.001 * noise (the N(0, 1) draws passed in), 10 steps of 2/255 on
  ``F.cross_entropy(model(x_adv, thread=None), y)`` in eval mode, min/max onto the eps-ball,
  clamp to [0, 1];
- train mode; ``requires_grad`` only on parameters named ``fc`` or ``lora``, the natural output
  ``model(x, thread='nat')``; then on everything but ``lora``, the adversarial output
  ``model(x_adv, thread=None)``;
- ``LAMBDA1 * CE(nat) + (1 - LAMBDA1) * CE(adv) + LAMBDA2 / B * KLDivLoss(sum)(log_softmax(adv),
  softmax(nat))``, then ``optim.SGD`` (every parameter) steps once.

The thread is a module-level switch here (advcl's backbone takes no thread argument).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lpaft import ascend

THREAD = [None]


class ConvLoRA(nn.Module):
    def __init__(self, conv, lora_A_nat, lora_B_nat, r_nat=8, lora_alpha=1):
        super().__init__()
        self.conv = conv
        self.lora_A_nat = nn.Parameter(lora_A_nat.clone())
        self.lora_B_nat = nn.Parameter(lora_B_nat.clone())
        self.scaling_nat = lora_alpha / r_nat

    def forward(self, x):
        if THREAD[0] == "nat":
            w = self.conv.weight + (self.lora_B_nat @ self.lora_A_nat).view(self.conv.weight.shape) * self.scaling_nat
            return self.conv._conv_forward(x, w, self.conv.bias)
        return self.conv._conv_forward(x, self.conv.weight, self.conv.bias)


def with_lora(net, a_list, b_list):
    """A copy of ``net`` whose block convolutions (in ``named_modules`` order) are ConvLoRA."""
    model = copy.deepcopy(net)
    convs = [name for name, m in model.backbone.layers.named_modules() if isinstance(m, nn.Conv2d)]
    for name, a, b in zip(convs, a_list, b_list, strict=True):
        parent, _, leaf = name.rpartition(".")
        owner = model.backbone.layers.get_submodule(parent)
        setattr(owner, leaf, ConvLoRA(getattr(owner, leaf), a, b))
    return model


def run(model, x, y, thread):
    THREAD[0] = thread
    try:
        return model(x)
    finally:
        THREAD[0] = None


def trades_loss_autolora(model, x_natural, y, noise, step_size=2 / 255, epsilon=8 / 255, perturb_steps=10,
                         LAMBDA1=0.0, LAMBDA2=0.0):
    batch_size = len(x_natural)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = ascend(lambda z: F.cross_entropy(run(model.eval(), z, y, None), y), x_natural,
                   x_natural.detach() + 0.001 * noise, step_size, epsilon, perturb_steps)

    model.zero_grad()
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad = "fc" in n or "lora" in n
    nat_output = run(model, x_natural, y, "nat")
    for n, p in model.named_parameters():
        p.requires_grad = "lora" not in n
    adv_output = run(model, x_adv, y, None)
    for p in model.parameters():
        p.requires_grad = True

    return (LAMBDA1 * F.cross_entropy(nat_output, y)
            + (1 - LAMBDA1) * F.cross_entropy(adv_output, y)
            + LAMBDA2 * (1.0 / batch_size) * criterion_kl(F.log_softmax(adv_output, dim=1), F.softmax(nat_output, dim=1)))
