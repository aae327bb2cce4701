"""One A-InfoNCE step (AdvCL with asymmetric InfoNCE) the way the authors' ``Asym-AdvCL`` code
computes it (yqy2001/A-InfoNCE: ``losses.py``'s ``ori_SupConLoss`` and ``SupConLoss``,
``pretraining_advCL.py``'s ``AttackPGD`` and ``train``), in the authors' structure, with nothing
from ``advcl_cli`` but the network it is handed (``model.backbone``, ``model.proj``,
``model.pseudo``), and AdvCL's views and pseudo-label CE from ``reference.advcl_step``.

Kept as coded, the places where the code is not what the paper writes:
- the loss matrix of the positives (``mix_square``) is the same tensor as the one its
  adversarial-clean block is read from (``tmp_square`` without the stop-gradient), so writing
  the (adv, clean) block changes the view the (clean, adv) block is then written from;
- the hard-negative weights ``imp * neg`` are divided by ``imp.mean(dim=-1)`` and the
  exponentials by ``pos + Ng``, both (B*V,) vectors broadcast over the last dimension (column j
  by row j's value);
- the hard-negative clamp uses a temperature of 0.5 whatever the loss's;
- the adaptive degree's distance runs x_org and x_cl through the "normal" BN set, no gradient.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .advcl_step import DEFAULTS, ReferenceAttack, _pseudo_ce, training_forward

# the authors' shell scripts (Asym-AdvCL/shell/cifar10/advcl-*-cifar10.sh) and argparse defaults
SCRIPTS = {
    "ip": dict(HN=False, stop_grad=True, stpg_degree=0.2, adv_weight=1.2, stop_grad_adaptive=30, tau_plus=0.1, beta=1.0),
    "hn": dict(HN=True, stop_grad=False, stpg_degree=-1.0, adv_weight=1.0, stop_grad_adaptive=-1, tau_plus=0.12, beta=1.0),
    "iphn": dict(HN=True, stop_grad=True, stpg_degree=0.2, adv_weight=0.7, stop_grad_adaptive=30, tau_plus=0.1, beta=1.0),
}


def script_args(variant: str, **changes) -> SimpleNamespace:
    return SimpleNamespace(**{"d_min": 0.4, **SCRIPTS[variant], **changes})


def _masks(batch_size: int, views: int, device):
    mask = torch.eye(batch_size, dtype=torch.float64, device=device).repeat(views, views)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * views, device=device).view(-1, 1), 0)
    return mask * logits_mask, logits_mask


def _hn_log_prob(anchor_dot_contrast, mask, logits_mask, n_neg, args):
    """SupConLoss's reweighted -log p (HCL's hard negatives), for every entry."""
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    exp_logits = torch.exp(anchor_dot_contrast - logits_max.detach())
    exp_logits_neg = exp_logits * (1 - mask) * logits_mask
    pos = (exp_logits * mask).sum(dim=1) / mask.sum(1)
    imp = (args.beta * (exp_logits_neg + 1e-9).log()).exp()
    reweight_logits_neg = (imp * exp_logits_neg) / imp.mean(dim=-1)
    ng = (-args.tau_plus * n_neg * pos + reweight_logits_neg.sum(dim=-1)) / (1 - args.tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.e ** (-1 / 0.5))
    return -torch.log(exp_logits / (pos + ng))


def _ori_log_prob(anchor_dot_contrast, logits_mask):
    """ori_SupConLoss's log p (with the row-max shift), for every entry."""
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    exp_logits = torch.exp(logits) * logits_mask
    return logits - torch.log(exp_logits.sum(1, keepdim=True))


class AsymSupCon:
    """``SupConLoss`` (``hn=True``) or ``ori_SupConLoss`` of the authors' losses.py, contrast
    mode "all", base temperature 0.07, no labels."""

    def __init__(self, args, temperature=0.5, hn=False, base_temperature=0.07):
        self.args, self.temperature, self.hn, self.base_temperature = args, temperature, hn, base_temperature

    def __call__(self, features, stop_grad=False, stop_grad_sd=-1.0):
        batch_size, contrast_count = features.shape[:2]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_dot_contrast = torch.matmul(contrast_feature, contrast_feature.T) / self.temperature
        if stop_grad:
            anchor_dot_contrast_stpg = torch.matmul(contrast_feature, contrast_feature.T.detach()) / self.temperature
        mask, logits_mask = _masks(batch_size, contrast_count, features.device)
        n_neg = (batch_size - 1) * contrast_count
        if self.hn:
            log_prob = _hn_log_prob(anchor_dot_contrast, mask, logits_mask, n_neg, self.args)
        else:
            log_prob = _ori_log_prob(anchor_dot_contrast, logits_mask)
        loss_square = mask * log_prob
        mix_square = loss_square
        if stop_grad:
            if self.hn:
                log_prob_stpg = _hn_log_prob(anchor_dot_contrast_stpg, mask, logits_mask, n_neg, self.args)
            else:
                log_prob_stpg = _ori_log_prob(anchor_dot_contrast_stpg, logits_mask)
            tmp_square = mask * log_prob_stpg
            ac_square = (stop_grad_sd * tmp_square[batch_size:, 0:batch_size].T
                         + (1 - stop_grad_sd) * tmp_square[0:batch_size, batch_size:])
        else:
            tmp_square = loss_square
            ac_square = tmp_square[0:batch_size, batch_size:]  # a view of mix_square, as in the code
        mix_square[0:batch_size, batch_size:] = ac_square * self.args.adv_weight
        mix_square[batch_size:, 0:batch_size] = ac_square.T * self.args.adv_weight
        mean_log_prob_pos = mix_square.sum(1) / mask.sum(1)
        sign = 1 if self.hn else -1
        loss = sign * (self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.view(contrast_count, batch_size).mean()


class AverageMeter:
    def __init__(self):
        self.sum, self.count, self.avg = 0, 0, 0

    def update(self, val, n=1):
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


class AsymAttack(ReferenceAttack):
    """AttackPGD with the scripts' ``--attack_ori``: ``ori_SupConLoss`` without the stop-gradient."""

    def __init__(self, model, args, **config):
        super().__init__(model, **config)
        self.loss = AsymSupCon(args)

    def criterion(self, features):
        return self.loss(features, stop_grad=False)


def stop_degree(model, x_org, x_cl, epoch: int, meter: AverageMeter, args):
    """train()'s adaptive grad stopping: the degree of this step (epoch 0-based)."""
    stop_grad_sd = args.stpg_degree
    if args.stop_grad_adaptive >= 0:
        with torch.no_grad():
            f_ori = model.backbone(x_org, "normal")
            f_cl = model.backbone(x_cl, "normal")
        mean_distance = F.pairwise_distance(f_ori, f_cl).mean()
        if epoch + 1 > args.stop_grad_adaptive:
            if mean_distance > meter.avg:
                pass
            elif mean_distance < args.d_min:
                stop_grad_sd = 0.5
            else:
                stop_grad_sd = ((meter.avg - mean_distance) / (meter.avg - args.d_min) * (0.5 - args.stpg_degree)
                                + args.stpg_degree)
        else:
            meter.update(mean_distance, x_org.shape[0])
    return stop_grad_sd


def reference_step(model, x1, x2, x_org, targets, uniform, args, *, epoch: int, meter: AverageMeter,
                   **config) -> dict:
    """The training loss of one batch (train mode) with the scripts' ``--attack_ori``: the attack
    ascends ``ori_SupConLoss`` without the stop-gradient; the loss is ``SupConLoss`` with --HN,
    else ``ori_SupConLoss``, with the step's degree. Returns the ``loss``, its ``contrast`` and
    ``pseudo_ce``, the ``degree`` and the adversarial views. ``config``: the attack's (DEFAULTS)."""
    criterion = AsymSupCon(args, hn=args.HN)
    model.train()
    x1, x2, x_cl, x_ce, x_hfc = AsymAttack(model, args, **config)(x1, x2, x_org, targets, uniform)
    features, feat_ce = training_forward(model, x1, x2, x_cl, x_ce, x_hfc)
    degree = stop_degree(model, x_org, x_cl, epoch, meter, args)
    contrast = criterion(features, stop_grad=args.stop_grad, stop_grad_sd=degree)
    pseudo = _pseudo_ce(model, feat_ce, targets, "mean")
    return {"loss": contrast + DEFAULTS["ce_weight"] * pseudo, "contrast": contrast, "pseudo_ce": pseudo,
            "degree": degree, "x_cl": x_cl, "x_ce": x_ce}
