"""Loss functions of the pretraining methods, as pure functions of tensors.

``supcon_loss`` is the SupCon loss (Khosla et al. 2020) in its unsupervised form, the one the
AdvCL code uses through ``SupConLoss(temperature=0.5)``: every one of the ``B * V`` vectors is an
anchor, its positives are the other ``V - 1`` views of the same image, its denominator runs over
all ``B * V - 1`` other vectors, and the mean over anchors is scaled by
``temperature / base_temperature`` (0.5 / 0.07 with SupConLoss's default base temperature).
With two views and ``base_temperature == temperature`` it is SimCLR's NT-Xent.

``nt_xent`` is the ACL family's contrastive loss: ``supcon_loss`` with two views, unscaled,
on projections it normalises itself.

``standard_invariance`` and ``adversarial_invariance`` are AIR's SIR and AIR regularisers
(Xu et al., NeurIPS 2023) as the authors' ``AIR.py`` computes them (see their docstrings: they
pass probabilities where ``kl_div`` expects log-probabilities, deliberately reproduced here).

``rocl_nt_xent`` is RoCL's own NT-Xent (Kim et al. 2020, ``loss.py``: ``pairwise_similarity``
and ``NT_xent``), which differs from ``nt_xent`` in three ways kept on purpose: the similarity
``z_i . sg(z_j)`` has its second factor detached (gradients flow through the anchor's row only),
the normalisation and the softmax carry ``+ 1e-8`` terms, and with three views every anchor has
two positives, each pair counted, the sum divided by the number of vectors.

``asym_supcon_loss`` is A-InfoNCE's (Yu et al., ECCV 2022) SupCon loss with asymmetric
positives, as the authors' ``Asym-AdvCL/losses.py`` computes it (``ori_SupConLoss`` and, with
hard negatives, ``SupConLoss``); see its docstring for the two places where the code differs
from the paper's formulas, both kept on purpose.

``pseudo_label_ce`` is AdvCL's pseudo-supervision term: the mean over the ClusterFit heads of the
cross-entropy, with ``-1`` labels ignored (``reduction="sum"`` inside the attack, ``"mean"`` in
the training loss, as in the reference).

All compute in the inputs' precision (float64 stays float64); half precisions from bf16
autocast are upcast to float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..device import upcast


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


def batch_logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """(B,) ``a_k . b_k / temperature`` of the L2-normalised rows: the diagonal of AIR's
    ``a @ b.T / temperature``, the logits its softmax runs over the batch index k with."""
    return (F.normalize(upcast(a), dim=-1) * F.normalize(upcast(b), dim=-1)).sum(-1) / temperature


def standard_invariance(z_i: Tensor, z_j: Tensor, z_o: Tensor, temperature: float = 0.5) -> Tensor:
    """AIR's SIR of the clean views' projections ``z_i``, ``z_j`` and the un-augmented view's
    ``z_o`` (B, D each, normalised here), as coded in the authors' ``AIR.py``:
    ``kl_div(softmax_k(d(z_i, z_o)), log_softmax_k(d(z_j, z_o)), log_target=True, reduction="sum")``
    with d = ``batch_logits``. ``kl_div`` takes its input as log-probabilities; the code passes
    probabilities, so the value is ``sum_k q_k (log q_k - p_k)`` (p, q the two softmaxes), not
    KL(q || p). Reproduced on purpose: it is what trained the released encoders. Gradients flow
    through every argument."""
    p = torch.softmax(batch_logits(z_i, z_o, temperature), dim=0)
    log_q = torch.log_softmax(batch_logits(z_j, z_o, temperature), dim=0)
    return F.kl_div(p, log_q, log_target=True, reduction="sum")


def adversarial_invariance(z_i: Tensor, z_j: Tensor, z_o: Tensor, za_i: Tensor, za_j: Tensor,
                           temperature: float = 0.5) -> Tensor:
    """AIR's AIR term, as coded: with the adversarial views' projections ``za_i``, ``za_j``,
    ``P_i = softmax_k(d(za_i, z_o)) * softmax_k(d(za_i, z_i))`` (a product of two softmaxes over
    the batch, not renormalised) and ``P_j`` likewise,
    ``kl_div(P_i, log P_j, log_target=True, reduction="sum") = sum_k P_j,k (log P_j,k - P_i,k)``:
    probabilities as the input again, as in ``standard_invariance``. ``log P_j`` is taken as the
    sum of the two log-softmaxes (the log of the product, without its underflow)."""
    p_i = torch.softmax(batch_logits(za_i, z_o, temperature), dim=0) * torch.softmax(batch_logits(za_i, z_i, temperature), dim=0)
    log_p_j = (torch.log_softmax(batch_logits(za_j, z_o, temperature), dim=0)
               + torch.log_softmax(batch_logits(za_j, z_j, temperature), dim=0))
    return F.kl_div(p_i, log_p_j, log_target=True, reduction="sum")


def rocl_nt_xent(z: Tensor, views: int, temperature: float = 0.5) -> Tensor:
    """RoCL's NT-Xent of ``z`` (V * B, D): ``views`` blocks of B rows, view-major (row k of every
    block is image k). With ``s_ij = (z_i / (|z_i| + 1e-8)) . sg(z_j / (|z_j| + 1e-8)) / t``,
    ``e_ij = exp(s_ij)`` off the diagonal: ``sum over positive pairs (i, j) of
    -log(e_ij / (sum_k e_ik + 1e-8) + 1e-8)``, divided by V * B."""
    z = upcast(z)
    n = z.shape[0]
    zn = z / (z.norm(dim=1, keepdim=True) + 1e-8)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    e = torch.exp(zn @ zn.T.detach() / temperature).masked_fill(eye, 0.0)
    nll = -torch.log(e / (e.sum(1, keepdim=True) + 1e-8) + 1e-8)
    image = torch.arange(n // views, device=z.device).repeat(views)
    positive = (image[:, None] == image[None, :]) & ~eye
    return (nll * positive).sum() / n


def asym_supcon_loss(features: Tensor, temperature: float = 0.5, base_temperature: float = 0.07, *,
                     adv_weight: float = 1.0, stop_grad: float | Tensor | None = None,
                     hard_negatives: tuple[float, float] | None = None) -> Tensor:
    """A-InfoNCE's loss of ``features`` (B, V, D), L2-normalised, view 0 the adversarial one.

    Every (anchor, positive) pair of ``supcon_loss`` has its term ``l[i, j] = -log p(j | i)``;
    the pairs of an adversarial and a clean view are changed:

    - ``stop_grad`` (the inferior-positive degree s, a number or a 0-d tensor): the terms are
      recomputed with the similarities' second factor detached (gradients reach the anchor's
      row only), and pair (adv a, clean c) gets ``s * l_sg[c, a] + (1 - s) * l_sg[a, c]``
      (s = 0: the clean view gets no gradient from the pair), in both directions;
    - ``adv_weight`` multiplies those terms. Without ``stop_grad`` the authors' code writes the
      (clean, adv) block through a view of the (adv, clean) one, so it becomes
      ``adv_weight ** 2 * l[a, c]`` (not ``l[c, a]``): reproduced as coded;
    - ``hard_negatives`` ``(tau_plus, beta)``: HCL's reweighted negatives. With ``e`` the
      similarities' exponentials shifted by the row maximum (the self-similarity),
      ``imp = (neg + 1e-9) ** beta``, ``Ng = (-tau_plus * N * pos + sum_k imp * neg / m) /
      (1 - tau_plus)`` clamped below at ``N * exp(-2)`` (the code fixes its temperature 0.5
      there), ``N = (B - 1) * V``, ``pos`` the mean of the positives' ``e``, and
      ``l[i, j] = -log(e[i, j] / (pos[j] + Ng[j]))``. As coded, two divisions broadcast over the
      last dimension: ``m`` for entry (i, k) is the mean of ``imp`` over row k, not over the
      anchor's row i, and the normaliser of ``l[i, j]`` is the positive j's ``pos + Ng``, not the
      anchor's (the authors' Asym-RoCL loss reshapes it to the anchor's; Asym-AdvCL does not).

    The sum over an anchor's positives is divided by V - 1 and the mean over anchors scaled by
    ``temperature / base_temperature``, as ``supcon_loss``."""
    b, v, _ = features.shape
    z = upcast(features.transpose(0, 1).reshape(b * v, -1))
    eye = torch.eye(b * v, dtype=torch.bool, device=z.device)
    image = torch.arange(b, device=z.device).repeat(v)
    positive = (image[:, None] == image[None, :]) & ~eye

    def nll(logits: Tensor) -> Tensor:
        if hard_negatives is None:
            return torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True) - logits
        tau_plus, beta = hard_negatives
        n = (b - 1) * v
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values.detach())
        neg = e * ~(positive | eye)
        pos = (e * positive).sum(1) / (v - 1)
        imp = torch.exp(beta * torch.log(neg + 1e-9))
        ng = (-tau_plus * n * pos + (imp * neg / imp.mean(dim=-1)).sum(-1)) / (1 - tau_plus)
        return -torch.log(e / (pos + ng.clamp(min=n * math.exp(-1 / 0.5))))  # broadcast over columns, as coded

    full = nll(z @ z.T / temperature) * positive
    if stop_grad is None:
        cross, back = full[:b, b:], adv_weight * adv_weight
    else:
        sg = nll(z @ z.T.detach() / temperature) * positive
        cross, back = stop_grad * sg[b:, :b].T + (1 - stop_grad) * sg[:b, b:], adv_weight
    per_anchor = torch.cat([adv_weight * cross.sum(1), back * cross.sum(0) + full[b:, b:].sum(1)]) / (v - 1)
    return (temperature / base_temperature) * per_anchor.mean()


def pseudo_label_ce(logits: list[Tensor], targets: list[Tensor], reduction: str = "mean") -> Tensor:
    """Mean over heads of the cross-entropy of each head's logits against its labels."""
    if len(logits) != len(targets) or not logits:
        raise ValueError(f"{len(logits)} heads but {len(targets)} label sets")
    total = sum(
        F.cross_entropy(upcast(lg), t, ignore_index=-1, reduction=reduction) for lg, t in zip(logits, targets)
    )
    return total / len(logits)
