"""One ACL step the way the authors' ``train_simCLR.py --ACL_DS`` computes it (tests only).

Written from REFERENCE.md's facts in the authors' structure, with nothing from ``advcl_cli`` but
the network it is handed (``model.backbone(x, bn_name)`` and ``model.proj(feat, bn_name)``):

- the batch is the two views interleaved, ``[img0 view1, img0 view2, img1 view1, ...]``, and
  goes through the model as one batch of 2B, as their ``inputs.view(d[0] * 2, ...)`` does;
- the model normalises its input with ImageNet's mean and std first (their
  ``NormalizeByChannelMeanStd``), written out here;
- ``pgd_contrastive``: a perturbation ``delta`` starting at eps * U(-1, 1) (the draws passed in),
  5 steps of 2/255 on the NT-Xent of ``model.eval()(inputs + delta, 'pgd')``, each step
  ``delta`` clamped to [-eps, eps] and then to ``[0, 1] - inputs``;
- the loss in train mode: (NT-Xent of the clean batch through 'normal' + NT-Xent of the attacked
  batch through 'pgd') / 2, the attacked batch first, as in their ``train``;
- their ``nt_xent``: cosine similarities, exp(sim / t), each row's positive its neighbour in the
  interleaved batch, denominator the column sum minus exp(1 / t) (the self-similarity);
- their LARS: local rate eta |w| / (|g| + wd |w|) (1 when a norm is below 1e-15),
  buf = m buf + lr local (g + wd w), w -= buf.
"""

from __future__ import annotations

import math

import torch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def forward(model, x, bn_name):
    # their buffers are torch.tensor(mean): float32 values, cast to the model's dtype
    mean = torch.tensor(IMAGENET[0]).to(x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET[1]).to(x.dtype).view(1, 3, 1, 1)
    return model.proj(model.backbone((x - mean) / std, bn_name), bn_name)


def pair_cosine_similarity(x, eps=1e-8):
    n = x.norm(p=2, dim=1, keepdim=True)
    return (x @ x.t()) / (n * n.t()).clamp(min=eps)


def nt_xent(x, t=0.5):
    x = torch.exp(pair_cosine_similarity(x) / t)
    idx = torch.arange(x.size(0))
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    x = x.diag() / (x.sum(0) - math.exp(1 / t))
    return -torch.log(x).mean()


def interleave(a, b):
    """[a0, b0, a1, b1, ...] from two (B, ...) tensors."""
    return torch.stack([a, b], dim=1).reshape(-1, *a.shape[1:])


def deinterleave(x):
    return x[0::2], x[1::2]


def pgd_contrastive(model, inputs, uniform, eps=8 / 255, alpha=2 / 255, iters=5):
    delta = uniform * eps  # their rand * 2 eps - eps, with rand * 2 - 1 passed in
    for _ in range(iters):
        delta = delta.detach().requires_grad_(True)
        loss = nt_xent(forward(model.eval(), inputs + delta, "pgd"))
        (grad,) = torch.autograd.grad(loss, [delta])
        delta = delta.detach() + alpha * grad.sign()
        delta = torch.clamp(delta, min=-eps, max=eps)
        delta = torch.clamp(inputs + delta, min=0, max=1) - inputs
    return (inputs + delta).detach()


def reference_step(model, x1, x2, uniform):
    """The loss (with its graph) and the attacked views, given the views and the U(-1, 1) draws
    (2, B, ...) of their random starts (``uniform[0]`` for x1, ``uniform[1]`` for x2)."""
    inputs = interleave(x1, x2)
    inputs_adv = pgd_contrastive(model, inputs, interleave(uniform[0], uniform[1]))
    features_adv = forward(model.train(), inputs_adv, "pgd")
    features = forward(model.train(), inputs, "normal")
    loss = (nt_xent(features) + nt_xent(features_adv)) / 2
    a1, a2 = deinterleave(inputs_adv)
    return {"loss": loss, "clean": nt_xent(features).detach(), "adv": nt_xent(features_adv).detach(), "a1": a1, "a2": a2}


@torch.no_grad()
def lars_step(params, lr=5.0, momentum=0.9, weight_decay=1e-6, eta=1e-3, buffers=None):
    """One step of the authors' LARS (fresh momentum buffers unless given)."""
    buffers = {} if buffers is None else buffers
    for p in params:
        if p.grad is None:
            continue
        w_norm, g_norm = torch.norm(p), torch.norm(p.grad)
        local = eta * w_norm / (g_norm + weight_decay * w_norm)
        if w_norm < 1e-15 or g_norm < 1e-15:
            local = torch.ones_like(local)
        buf = buffers.setdefault(p, torch.zeros_like(p))
        buf.mul_(momentum).add_(local * lr * (p.grad + weight_decay * p))
        p.sub_(buf)
    return buffers
