"""One DynACL pretraining step, and its schedules, the way the authors' ``train_DynACL.py``
computes them (PKU-ML/DYNACL, with ``models/resnet_multi_bn.py``'s ``resnet18_momentum`` and
``utils.py``).

Written from the facts of that code, in its structure, sharing nothing with ``advcl_cli`` but
the networks it is handed (``net.backbone(x, bn)`` and ``net.proj(feat, bn)``; the ImageNet
normalisation is done here, as the authors' ``NormalizeByChannelMeanStd``):

- the two views of every image are interleaved, ``[x1_0, x2_0, x1_1, x2_1, ...]``; with
  ``swap=True`` the even rows go through ``encoder_q`` and the odd ones through ``encoder_k``,
  each as a batch of its own; without a momentum encoder (``k=None``: the AIR and RCS
  re-implementations) the whole interleaved batch goes through one network;
- ``PGD_contrastive``: ``delta`` starts at the given U(-eps, eps) draw, then ``iters`` steps:
  ``model.eval()`` features of ``inputs + delta`` through "pgd", the authors' ``nt_xent``,
  ``delta += alpha * sign(grad)``, clamped to [-eps, eps], then ``inputs + delta`` to [0, 1];
- the step: adversarial features ("pgd", train mode), clean features ("normal", train mode), the
  momentum update ``k = k * m + q * (1 - m)`` of the parameters, the weight
  ``min(1 + (epoch // K) * (K / epochs) * swap, 2)`` (1-based epoch) and the loss
  ``(nt_xent(clean) * (2 - weight) + nt_xent(adv) * weight) / 2``. The caller does backward
  and the optimizer step (the authors': after the momentum update);
- the schedules as the training loop runs them: the strength set when the loader is rebuilt
  (1-based epochs with ``epoch % K == 1``, or every epoch when K is 1) to ``1 - (epoch - 1) /
  epochs``; the rate of ``LambdaLR(cosine_annealing(step, epochs, 1, 1e-6 / lr, warmup 10))``
  read at the start of every epoch, ``scheduler.step()`` after it.

The authors' forward collects the two halves in ``torch.zeros(bsz, 512)`` (float32 on the
CPU) and their ``nt_xent`` subtracts ``exp(torch.tensor(1 / t))`` (float32); here both have the
features' dtype, so that a float64 test compares to 1e-10.
"""

from __future__ import annotations

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def encoder(net, x, bn):
    """The authors' ResNet forward with ``fc = proj_head``: normalise (their buffers are
    ``torch.tensor(mean)``, float32, in the model's dtype after ``.double()``), backbone,
    projection."""
    mean = torch.tensor(MEAN).to(x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD).to(x.dtype).view(1, 3, 1, 1)
    return net.proj(net.backbone(x.sub(mean).div(std), bn), bn)


class ResNetMomentum:
    """``resnet18_momentum``: ``encoder_q`` trained, ``encoder_k`` its momentum copy."""

    def __init__(self, q, k=None, m=0.99):
        self.encoder_q, self.encoder_k, self.m = q, k, m

    def _mode(self, training):
        for net in (self.encoder_q, self.encoder_k):
            if net is not None:
                net.train(training)
        return self

    def train(self):
        return self._mode(True)

    def eval(self):
        return self._mode(False)

    def __call__(self, x, bn_name, swap=True):
        if self.encoder_k is None:
            return encoder(self.encoder_q, x, bn_name)
        q_out = encoder(self.encoder_q, x[::2], bn_name)
        out = torch.zeros(x.size()[0], q_out.shape[1], dtype=q_out.dtype)
        out[::2] = q_out
        out[1::2] = encoder(self.encoder_k, x[1::2], bn_name)
        return out

    @torch.no_grad()
    def momentum_update_encoder_k(self):
        if self.encoder_k is None:
            return
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)


def pair_cosine_similarity(x, eps=1e-8):
    n = x.norm(p=2, dim=1, keepdim=True)
    return (x @ x.t()) / (n * n.t()).clamp(min=eps)


def nt_xent(x, t=0.5):
    """The authors' NT-Xent of interleaved pairs (rows 2i and 2i + 1 are one image's views)."""
    x = pair_cosine_similarity(x)
    x = torch.exp(x / t)
    idx = torch.arange(x.size()[0])
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    x = x.diag() / (x.sum(0) - torch.exp(torch.tensor(1 / t, dtype=x.dtype)))
    return -torch.log(x).mean()


def interleave(a, b):
    """``[a_0, b_0, a_1, b_1, ...]``, as ``torch.stack([view1, view2])`` per image, then ``view``."""
    return torch.stack([a, b], dim=1).reshape(2 * a.shape[0], *a.shape[1:])


def pgd_contrastive(model, inputs, delta0, eps=8.0 / 255.0, alpha=2.0 / 255.0, iters=5):
    delta = torch.nn.Parameter(delta0.clone())
    for _ in range(iters):
        features = model.eval()(inputs + delta, "pgd", swap=True)
        loss = nt_xent(features)
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.data = delta.data + alpha * grad.sign()
        delta.data = torch.clamp(delta.data, min=-eps, max=eps)
        delta.data = torch.clamp(inputs + delta.data, min=0, max=1) - inputs
    return (inputs + delta).detach()


def weight_adv(epoch, epochs=1000, reload_frequency=50, swap_param=2 / 3):
    """The adversarial term's factor of 1-based ``epoch``."""
    return min(1.0 + (epoch // reload_frequency) * (reload_frequency / epochs) * swap_param, 2)


def train_step(q, k, x1, x2, delta1, delta2, epoch, *, epochs=1000, m=0.99, eps=8 / 255, alpha=2 / 255, iters=5,
               reload_frequency=50, swap_param=2 / 3):
    """One step of the authors' ``train()`` on views ``x1``, ``x2`` with the attack's starts
    ``delta1``, ``delta2`` (in [-eps, eps]); ``epoch`` is 1-based. Returns the loss (with its
    graph), its two NT-Xent terms and the attacked views (de-interleaved)."""
    model = ResNetMomentum(q, k, m)
    inputs = interleave(x1, x2)
    inputs_adv = pgd_contrastive(model, inputs, interleave(delta1, delta2), eps, alpha, iters)
    features_adv = model.train()(inputs_adv, "pgd", swap=True)
    features = model.train()(inputs, "normal", swap=True)
    model.momentum_update_encoder_k()
    weight = weight_adv(epoch, epochs, reload_frequency, swap_param)
    clean, adv = nt_xent(features), nt_xent(features_adv)
    loss = (clean * (2 - weight) + adv * weight) / 2
    return {"loss": loss, "clean": clean, "adv": adv, "a1": inputs_adv[::2], "a2": inputs_adv[1::2], "weight": weight}


def cosine_annealing(step, total_steps, lr_max, lr_min, warmup_steps=0):
    if step < warmup_steps:
        return lr_max * (step + 1) / warmup_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos((step - warmup_steps) / (total_steps - warmup_steps) * np.pi))


def training_loop_schedules(epochs=1000, lr=5.0, reload_frequency=50):
    """{1-based epoch: (strength, weight factor, lr)} as the training loop runs them."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda=lambda step: cosine_annealing(step, epochs, 1, 1e-6 / lr, warmup_steps=10))
    out, strength = {}, None
    for epoch in range(1, epochs + 1):
        if epoch % reload_frequency == 1 or reload_frequency == 1:
            strength = 1 - (epoch - 1) / epochs
        out[epoch] = (strength, weight_adv(epoch, epochs, reload_frequency), opt.param_groups[0]["lr"])
        opt.step()  # train(): the updates of the epoch, then
        scheduler.step()
    return out


__all__ = ["ResNetMomentum", "interleave", "nt_xent", "train_step", "training_loop_schedules", "weight_adv"]
