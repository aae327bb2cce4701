"""One RoCL step the way the authors' ``rocl_train.py`` computes it (tests only).

Written from the authors' ``src/`` (Kim-Minseon/RoCL: ``RepresentationAdv.get_loss`` in
``attack_lib.py``, ``pairwise_similarity`` and ``NT_xent`` in ``loss.py``, ``train`` in
``rocl_train.py``, run with ``--advtrain_type Rep --loss_type sim --attack_to other
--regularize_to other``) in their structure, with nothing from ``advcl_cli`` but the network it
is handed: ``model`` is ``net.backbone(x, "normal")`` and ``projector`` is ``net.proj``.

- ``pairwise_similarity``: ``outputs / (|outputs| + 1e-8)``, then
  ``(1 / t) * mm(norm, norm.T.detach())``;
- ``NT_xent``: ``exp(sim) * (1 - eye)``, ``-log(e / (row sum + 1e-8) + 1e-8)``, the positives'
  diagonals of the off-diagonal blocks summed (two blocks with two views, six with three), over
  the number of rows;
- ``get_loss``: ``x = clamp(x1 + U(-eps, eps), 0, 1)``, model and projector in eval mode, ``k``
  steps on ``NT_xent(cat(x, x2))`` at temperature 0.5: ``x.data += alpha * sign(grad)``, clamp to
  [0, 1], then clamp into [x1 - eps, x1 + eps]; back in train mode the regulariser
  ``(1 / lamda) * NT_xent(cat(x, x2))``;
- ``train``: ``NT_xent`` of ``cat(x1, x2, x_adv)`` through projector(model(.)) as one batch, plus
  the regulariser.

With ``args`` the three-view loss is A-InfoNCE's, as the authors' ``Asym-RoCL/loss.py`` computes
it: ``NT_xent`` with ``--stop_grad`` (the six positive diagonals, the four adversarial-clean ones
weighted by ``adv_weight`` times ``stpg_degree`` (clean anchors) or ``1 - stpg_degree``
(adversarial anchors)) and ``NT_xent_HN`` with ``--HN`` (HCL's reweighted negatives on the
unshifted ``exp(sim)`` with its diagonal kept, ``imp.mean(dim=-1)`` broadcast over the last
dimension as coded, the clamp at ``N_neg * e ** (-1 / 0.5)``, the normaliser per anchor row).
"""

from __future__ import annotations

import torch

from .ainfonce_step import hcl_pos_ng, masks


def pairwise_similarity(outputs, temperature=0.5):
    b = outputs.shape[0]
    outputs_norm = outputs / (outputs.norm(dim=1).view(b, 1) + 1e-8)
    return (1.0 / temperature) * torch.mm(outputs_norm, outputs_norm.transpose(0, 1).detach())


def nt_xent(similarity, views):
    n2 = len(similarity)
    n = n2 // views
    e = torch.exp(similarity) * (1 - torch.eye(n2, n2, dtype=similarity.dtype))
    nll = -torch.log(e / (torch.sum(e, dim=1).view(n2, 1) + 1e-8) + 1e-8)
    if views == 2:
        return (1.0 / float(n2)) * torch.sum(torch.diag(nll[0:n, n:]) + torch.diag(nll[n:, 0:n]))
    return (1.0 / float(n2)) * torch.sum(
        torch.diag(nll[0:n, n:2 * n]) + torch.diag(nll[n:2 * n, 0:n]) + torch.diag(nll[0:n, 2 * n:])
        + torch.diag(nll[2 * n:, 0:n]) + torch.diag(nll[n:2 * n, 2 * n:]) + torch.diag(nll[2 * n:, n:2 * n]))


def _positive_sum(nll, n, args):
    """The Rep branch's sum of the positive diagonals, with --stop_grad's weights."""
    clean = torch.diag(nll[0:n, n:2 * n]) + torch.diag(nll[n:2 * n, 0:n])
    to_adv = torch.diag(nll[0:n, 2 * n:]) + torch.diag(nll[n:2 * n, 2 * n:])
    from_adv = torch.diag(nll[2 * n:, 0:n]) + torch.diag(nll[2 * n:, n:2 * n])
    if args.stop_grad:
        return torch.sum(clean + args.adv_weight * (to_adv * args.stpg_degree + from_adv * (1 - args.stpg_degree)))
    return torch.sum(clean + to_adv + from_adv)


def asym_nt_xent(similarity, args):
    """Asym-RoCL's ``NT_xent`` / ``NT_xent_HN`` (``args.HN``) of the three views' similarity."""
    n2 = len(similarity)
    n = n2 // 3
    if not args.HN:
        e = torch.exp(similarity) * (1 - torch.eye(n2, n2, dtype=similarity.dtype))
        nll = -torch.log(e / (torch.sum(e, dim=1).view(n2, 1) + 1e-8) + 1e-8)
        return (1.0 / float(n2)) * _positive_sum(nll, n, args)
    e = torch.exp(similarity)
    mask, logits_mask = masks(n, 3, similarity.device)
    pos, ng = hcl_pos_ng(e, mask, logits_mask, (n - 1) * 3, args.tau, args.beta)
    nll = -torch.log(e / ((pos + ng).view(n2, 1)))
    return (1.0 / float(n2)) * _positive_sum(nll, n, args)


def reference_step(net, x1, x2, uniform, *, eps=0.0314, alpha=0.007, k=7, lamda=256.0, temperature=0.5, args=None):
    """The loss (with its graph), its two parts and the adversarial view, given the views and the
    U(-1, 1) draws of the random start; ``args``: Asym-RoCL's (HN, tau, beta, stop_grad,
    stpg_degree, adv_weight) for A-InfoNCE's three-view loss."""
    def model(x):
        return net.backbone(x, "normal")

    projector = net.proj
    x = torch.clamp(x1 + eps * uniform, 0.0, 1.0)
    x.requires_grad = True
    net.eval()
    with torch.enable_grad():
        for _ in range(k):
            output = projector(model(torch.cat((x, x2))))
            loss = nt_xent(pairwise_similarity(output, temperature=0.5), 2)
            grads = torch.autograd.grad(loss, x, only_inputs=True, retain_graph=False)[0]
            x.data += alpha * torch.sign(grads.data)
            x = torch.clamp(x, 0.0, 1.0)
            x = torch.max(torch.min(x, x1 + eps), x1 - eps)
    net.train()
    reg = (1.0 / lamda) * nt_xent(pairwise_similarity(projector(model(torch.cat((x, x2)))), temperature=0.5), 2)
    advinputs = x.detach()
    outputs = projector(model(torch.cat((x1, x2, advinputs))))
    similarity = pairwise_similarity(outputs, temperature=temperature)
    simloss = nt_xent(similarity, 3) if args is None else asym_nt_xent(similarity, args)
    return {"loss": simloss + reg, "nt_xent": simloss.detach(), "reg": reg.detach(), "x_adv": advinputs}
