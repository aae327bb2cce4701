"""One ACL-AIR pretraining step the way the authors' code computes it.

Written from the facts of GodXuxilie/Enhancing_ACL_via_AIR (``pretraining.py``: ``train`` and
``PGD_contrastive`` with ``--ACL_DS``; ``AIR.py``: ``AIR_Loss``), in their layout and order of
operations, sharing nothing with advcl_cli but the network. ``model(x, bn)`` is their
``model(x, bn_name)``: [0, 1] images to the (unnormalised) output of the projection head, both
the backbone and the head through BN set ``bn``; ``net`` is the module whose train/eval mode
the step switches. The attack's start ``delta`` ~ U(-eps, eps) is injected, in the authors'
interleaved layout.

- The batch: per image the two augmented views stacked, viewed as 2B rows
  [x1_0, x2_0, x1_1, x2_1, ...]; the un-augmented image x_o (``ToTensor()``) beside it.
- PGD: the model in eval mode through "pgd", the NT-Xent of the interleaved rows (cosine
  similarities, exp(s / t), each row's positive its neighbour, the self term exp(1 / t)
  subtracted from the column sums), a signed step of alpha on delta, delta clamped to
  [-eps, eps], then x + delta clamped to [0, 1].
- Train mode: the attacked rows through "pgd", the clean rows through "normal", then x_o
  through "normal" alone; even rows are view i, odd rows view j.
- The loss (``AIR_Loss``): every projection L2-normalised; the clean and the adversarial
  NT-Xent as a cross-entropy over [positive, 2B - 2 negatives] logits at temperature 0.5;
  SIR and AIR from the diagonals of the similarity matrices, softmaxed over the batch, through
  ``F.kl_div(..., log_target=True, reduction="sum")`` with probabilities as the input, as
  coded; (1 - w) clean + (1 + w) adversarial + lambda1 SIR + lambda2 AIR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULTS = {"eps": 8 / 255, "alpha": 2 / 255, "iters": 5, "temperature": 0.5, "lambda1": 0.5, "lambda2": 0.5}


def interleave(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The authors' (B, 2, ...) batch of stacked view pairs, viewed as 2B rows."""
    return torch.stack([x1, x2], dim=1).reshape(-1, *x1.shape[1:])


def cosine_matrix(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n = x.norm(p=2, dim=1, keepdim=True)
    return (x @ x.t()) / (n * n.t()).clamp(min=eps)


def interleaved_nt_xent(rows: torch.Tensor, t: float) -> torch.Tensor:
    """The attack's NT-Xent of interleaved rows (pretraining.py's ``nt_xent``)."""
    e = torch.exp(cosine_matrix(rows) / t)
    partner = torch.arange(e.shape[0]) ^ 1  # 0 <-> 1, 2 <-> 3, ...
    e = e[partner]
    ratio = e.diag() / (e.sum(0) - torch.exp(torch.tensor(1 / t, dtype=e.dtype)))
    return -torch.log(ratio).mean()


def pgd_contrastive(model, net, inputs: torch.Tensor, delta: torch.Tensor, *, eps, alpha, iters, temperature):
    delta = delta.clone()
    for _ in range(iters):
        delta.requires_grad_(True)
        net.eval()
        loss = interleaved_nt_xent(model(inputs + delta, "pgd"), temperature)
        grad, = torch.autograd.grad(loss, delta)
        delta = delta.detach() + alpha * grad.sign()
        delta = torch.clamp(delta, min=-eps, max=eps)
        delta = torch.clamp(inputs + delta, min=0, max=1) - inputs
    return (inputs + delta).detach()


def contrastive_ce(zi: torch.Tensor, zj: torch.Tensor, t: float) -> torch.Tensor:
    """AIR_Loss's NT-Xent: for each of the 2B anchors, class 0 is its positive, then its
    2B - 2 negatives (the other images' views, both of them)."""
    bs = zi.shape[0]
    off = ~torch.eye(bs, dtype=torch.bool)
    s_ii, s_ij, s_ji, s_jj = zi @ zi.t() / t, zi @ zj.t() / t, zj @ zi.t() / t, zj @ zj.t() / t
    pos = torch.cat([s_ij.diag(), s_ji.diag()]).unsqueeze(1)
    neg_i = torch.cat([s_ii[off].reshape(bs, -1), s_ij[off].reshape(bs, -1)], dim=1)
    neg_j = torch.cat([s_ji[off].reshape(bs, -1), s_jj[off].reshape(bs, -1)], dim=1)
    logits = torch.cat([pos, torch.cat([neg_i, neg_j])], dim=1)
    return F.cross_entropy(logits, torch.zeros(2 * bs, dtype=torch.long))


def air_loss(zi, zj, z_orig, zi_adv, zj_adv, weight=0.0, *, temperature=0.5, lambda1=0.5, lambda2=0.5):
    """(loss, clean NT-Xent, adversarial NT-Xent, SIR, AIR), as ``AIR_Loss.forward``."""
    t = temperature
    zi, zj, zo, zia, zja = (F.normalize(z, p=2, dim=-1) for z in (zi, zj, z_orig, zi_adv, zj_adv))
    nat = contrastive_ce(zi, zj, t)
    adv = contrastive_ce(zia, zja, t)

    sir_input = F.softmax((zi @ zo.t() / t).diag(), -1)
    sir_target = F.log_softmax((zj @ zo.t() / t).diag(), -1)
    sir = F.kl_div(sir_input, sir_target, log_target=True, reduction="sum")

    consistency_i = F.softmax((zia @ zi.t() / t).diag(), -1)
    consistency_j = F.softmax((zja @ zj.t() / t).diag(), -1)
    p_i = F.softmax((zia @ zo.t() / t).diag(), -1) * consistency_i
    p_j = F.softmax((zja @ zo.t() / t).diag(), -1) * consistency_j
    air = F.kl_div(p_i, torch.log(p_j), log_target=True, reduction="sum")

    loss = nat * (1 - weight) + adv * (1 + weight) + lambda1 * sir + lambda2 * air
    return loss, nat, adv, sir, air


def reference_step(model, net, x1, x2, x_o, delta1, delta2, weight=0.0, **config):
    """One step's loss and parts: {"loss", "clean", "adv", "sir", "air", "a1", "a2"}; ``delta1``
    and ``delta2`` are the random starts of the two views."""
    cfg = {**DEFAULTS, **config}
    bs = x1.shape[0]
    inputs = interleave(x1, x2)
    inputs_adv = pgd_contrastive(model, net, inputs, interleave(delta1, delta2), eps=cfg["eps"], alpha=cfg["alpha"],
                                 iters=cfg["iters"], temperature=cfg["temperature"])
    net.train()
    features_adv = model(inputs_adv, "pgd")
    features = model(inputs, "normal")
    z_orig = model(x_o, "normal")
    even, odd = [2 * i for i in range(bs)], [2 * i + 1 for i in range(bs)]
    loss, nat, adv, sir, air = air_loss(features[even], features[odd], z_orig, features_adv[even], features_adv[odd],
                                        weight, temperature=cfg["temperature"], lambda1=cfg["lambda1"],
                                        lambda2=cfg["lambda2"])
    return {"loss": loss, "clean": nat, "adv": adv, "sir": sir, "air": air,
            "a1": inputs_adv[even], "a2": inputs_adv[odd]}
