"""One AdvCL pretraining step the way the authors' ``pretraining_advCL.py`` computes it.

Written from REFERENCE.md's facts, in the authors' structure, with nothing from ``advcl_cli``
but the network it is handed (``model.backbone(x, bn_name)``, ``model.proj``, ``model.pseudo``):

- an attack object that, at every PGD step, runs all five views through the model: x_cl
  ("pgd"), x_ce ("pgd_ce", through the projection head too, unused, as the authors do),
  x1, x2 and x_HFC ("normal"), in train mode; the joint loss is the SupCon loss of
  [x_cl, x1, x2, x_HFC] plus 0.2 x the pseudo-label CE summed over the batch and averaged over
  the heads; both adversarial views take a signed step of 2/255, are projected onto the
  8/255 L-inf ball around x_org and clamped to [0, 1];
- the random start x_org + eps * U(-1, 1), not clamped (the U(-1, 1) draws are passed in, so
  that a test can give both implementations the same ones);
- the HFC view: per channel FFT, shift, zero every frequency closer than r to the centre
  (rows/2, rows/2) (the authors' centre), unshift, inverse FFT, real part;
- after the attack every view goes through the model once more and the training loss is
  SupCon + 0.2 x the pseudo-label CE with batch means.

The SupCon loss is written out here too: every one of the 4B L2-normalised vectors is an
anchor, its positives are the 3 other views of its image, its denominator all 4B - 1 others;
temperature 0.5, scaled by 0.5 / 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the authors' defaults, under their names (pretraining_advCL.py's config dict and arguments)
DEFAULTS = {"epsilon": 8 / 255, "num_steps": 5, "step_size": 2 / 255, "nce_t": 0.5, "base_temperature": 0.07,
            "ce_weight": 0.2, "radius": 8}


def supcon(features: torch.Tensor, temperature: float, base_temperature: float) -> torch.Tensor:
    """features: (B, V, D), each row L2-normalised."""
    b, v, _ = features.shape
    rows = torch.cat([features[:, k] for k in range(v)])  # view 0 of every image, then view 1, ...
    image = torch.arange(b, device=rows.device).repeat(v)
    similarity = rows @ rows.t() / temperature
    similarity = similarity - similarity.max(dim=1, keepdim=True).values.detach()  # stability only
    others = ~torch.eye(b * v, dtype=torch.bool, device=rows.device)
    positive = (image[:, None] == image[None, :]) & others
    log_denominator = torch.log((similarity.exp() * others).sum(dim=1, keepdim=True))
    log_prob = similarity - log_denominator
    per_anchor = (log_prob * positive).sum(dim=1) / positive.sum(dim=1)
    return (-(temperature / base_temperature) * per_anchor).mean()


def high_frequency(images: torch.Tensor, r: float) -> torch.Tensor:
    rows, cols = images.shape[-2:]
    i = torch.arange(rows, dtype=torch.float64).view(rows, 1)
    j = torch.arange(cols, dtype=torch.float64).view(1, cols)
    low = torch.sqrt((i - rows / 2) ** 2 + (j - rows / 2) ** 2) < r
    keep = (~low).to(images.dtype).to(images.device)
    spectrum = torch.fft.fftshift(torch.fft.fftn(images, dim=(-2, -1)), dim=(-2, -1))
    back = torch.fft.ifftn(torch.fft.ifftshift(spectrum * keep, dim=(-2, -1)), dim=(-2, -1))
    return back.real


def _heads(model, feat):
    return [head(feat) for head in model.pseudo.values()]


def _pseudo_ce(model, feat, targets, reduction):
    logits = _heads(model, feat)
    return sum(F.cross_entropy(lg, t, reduction=reduction, ignore_index=-1) / len(logits) for lg, t in zip(logits, targets))


class ReferenceAttack:
    """The authors' AttackPGD: every PGD step recomputes every view's forward pass."""

    def __init__(self, model, **config):
        self.model, self.cfg = model, {**DEFAULTS, **config}

    def objective(self, x1, x2, x_hfc, x_cl, x_ce, targets):
        m, cfg = self.model, self.cfg
        z_cl = m.proj(m.backbone(x_cl, "pgd"))
        feat_ce = m.backbone(x_ce, "pgd_ce")
        m.proj(feat_ce)  # computed and not used, as in the authors' code
        z1 = m.proj(m.backbone(x1, "normal"))
        z2 = m.proj(m.backbone(x2, "normal"))
        z_hfc = m.proj(m.backbone(x_hfc, "normal"))
        contrast = self.criterion(torch.stack([z_cl, z1, z2, z_hfc], dim=1))
        return contrast + cfg["ce_weight"] * _pseudo_ce(m, feat_ce, targets, "sum")

    def criterion(self, features):
        """The contrastive loss the attack ascends."""
        return supcon(features, self.cfg["nce_t"], self.cfg["base_temperature"])

    def __call__(self, x1, x2, x_org, targets, uniform):
        """``uniform`` (2, B, C, H, W) in [-1, 1]: the random starts of x_cl and x_ce."""
        eps, step = self.cfg["epsilon"], self.cfg["step_size"]
        x_hfc = high_frequency(x_org, self.cfg["radius"])
        x_cl = x_org + uniform[0] * eps
        x_ce = x_org + uniform[1] * eps
        for _ in range(self.cfg["num_steps"]):
            x_cl.requires_grad_()
            x_ce.requires_grad_()
            with torch.enable_grad():
                loss = self.objective(x1, x2, x_hfc, x_cl, x_ce, targets)
            g_cl, g_ce = torch.autograd.grad(loss, [x_cl, x_ce])
            x_cl = torch.clamp(torch.min(torch.max(x_cl.detach() + step * g_cl.sign(), x_org - eps), x_org + eps), 0, 1)
            x_ce = torch.clamp(torch.min(torch.max(x_ce.detach() + step * g_ce.sign(), x_org - eps), x_org + eps), 0, 1)
        return x1, x2, x_cl, x_ce, x_hfc


def training_forward(model, x1, x2, x_cl, x_ce, x_hfc):
    """train()'s forward passes after the attack: the (B, 4, D) projections [x_cl, x1, x2,
    x_HFC] and x_ce's backbone feature."""
    z_cl = model.proj(model.backbone(x_cl, "pgd"))
    feat_ce = model.backbone(x_ce, "pgd_ce")
    model.proj(feat_ce)  # unused, as in the authors' code
    z1 = model.proj(model.backbone(x1, "normal"))
    z2 = model.proj(model.backbone(x2, "normal"))
    z_hfc = model.proj(model.backbone(x_hfc, "normal"))
    return torch.stack([z_cl, z1, z2, z_hfc], dim=1), feat_ce


def reference_step(model, x1, x2, x_org, targets, uniform, **config) -> dict:
    """The training loss of one batch (the model in train mode), as the authors' ``train()``:
    returns the total ``loss`` (with its graph), its ``contrast`` and ``pseudo_ce`` parts and the
    views ``x_cl``, ``x_ce``, ``x_hfc``. The caller does backward and the optimizer step."""
    cfg = {**DEFAULTS, **config}
    model.train()
    x1, x2, x_cl, x_ce, x_hfc = ReferenceAttack(model, **cfg)(x1, x2, x_org, targets, uniform)
    features, feat_ce = training_forward(model, x1, x2, x_cl, x_ce, x_hfc)
    contrast = supcon(features, cfg["nce_t"], cfg["base_temperature"])
    pseudo = _pseudo_ce(model, feat_ce, targets, "mean")
    return {"loss": contrast + cfg["ce_weight"] * pseudo, "contrast": contrast, "pseudo_ce": pseudo,
            "x_cl": x_cl, "x_ce": x_ce, "x_hfc": x_hfc}
