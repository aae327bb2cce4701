"""AdvCL (Fan et al., NeurIPS 2021): adversarial contrastive pretraining with a high-frequency
view and ClusterFit pseudo-supervision.

One step, matched to the authors' ``pretraining_advCL.py`` (class ``AttackPGD`` and ``train``):

- views of every image, in [0, 1]: ``x1``, ``x2`` (SimCLR augmentations), ``x_org``
  (crop with 4-pixel padding + flip) and ``x_HFC``, the high-frequency part of ``x_org``
  (not clamped);
- the model stays in train mode for the whole step, the attack included: every forward pass
  uses its batch's BN statistics and updates that set's running statistics, as in the code;
- every view goes through the backbone as its own batch (BN statistics per view, never over
  concatenated views): ``x1``, ``x2``, ``x_HFC`` with the "normal" set, ``x_cl`` with "pgd",
  ``x_ce`` with "pgd_ce";
- attack: ``x_cl`` and ``x_ce`` start at ``x_org + U(-eps, eps)`` (not clamped at the start),
  then take ``pgd_steps`` signed-gradient steps of ``pgd_step_size``, each followed by a
  projection onto the L-inf ball around ``x_org`` and a clamp to [0, 1]. Both ascend one joint
  loss, ``supcon([z_cl, z1, z2, z_HFC]) + ce_weight * sum-over-batch pseudo CE / heads``; as the
  contrastive term does not depend on ``x_ce`` and the CE term not on ``x_cl``, each ascends its
  own term. Gradients are taken w.r.t. the inputs only, and no graph outlives a PGD step;
- the clean views' forward passes are computed once per step, before the attack, and their
  (detached) projections are reused at every PGD step and (with their graph) in the final
  loss. The reference recomputes them at every PGD step and again after the attack; with the
  same weights and train-mode BN that gives the same numbers, so the losses, adversarial
  examples and gradients are identical; only the running statistics of the "normal" BN set and
  of the projection head's BN see fewer updates (tests/reference holds an independent copy of
  the reference's step, and tests/test_advcl_reference.py compares the two in float64);
- training loss: ``supcon([z_cl, z1, z2, z_HFC]) + ce_weight * mean over heads of CE`` (batch
  mean), the SupCon loss with temperature 0.5 scaled by 0.5 / 0.07; the projections are
  all-gathered across ranks first, so the loss sees the global batch (PGD runs on each rank's
  slice; its contrastive loss, too, sees every rank's projections);
- the reference also passes ``x_ce`` through the projection and predictor heads and never
  uses the result (it only moves BN running statistics); we skip it;
- everything runs in the model's float dtype (float64 too: the views, the random start and the
  losses follow the parameters' dtype).

Without pseudo labels the CE term and ``x_ce`` are dropped (the engine says so on stderr).

A-InfoNCE (Yu et al., ECCV 2022; yqy2001/A-InfoNCE ``Asym-AdvCL/``: ``pretraining_advCL.py``,
``losses.py``, ``shell/cifar10/advcl-{IP,HN,IPHN}-cifar10.sh``) is ``--a-infonce ip|hn|iphn``
(off by default): the contrastive term becomes ``losses.asym_supcon_loss``, everything else is
AdvCL's step:

- the attack ascends that loss with the adversarial-clean terms weighted by ``ip_weight`` and
  neither stop-gradient nor hard negatives (every script passes ``--attack_ori``, and the IP
  script's criterion is that loss anyway);
- ``ip``: the training loss weighs the adversarial-clean pairs by ``ip_weight`` with the
  stop-gradient degree s: ``stpg_degree`` for the first ``stpg_adaptive_epochs`` epochs, which
  accumulate the batch-weighted mean of d, the mean L2 distance between the backbone
  features of x_org and x_cl, both through the "normal" BN set without gradients (train mode,
  as the code); afterwards, with that mean a: s = ``stpg_degree`` if d > a, 0.5 if d <
  ``stpg_d_min``, else ``(a - d) / (a - d_min) * (0.5 - stpg_degree) + stpg_degree``. The
  accumulated sum and count are resume state; under torchrun d is the global batch's mean;
- ``hn``: HCL's hard-negative reweighting (``tau_plus``, ``hn_beta``), no stop-gradient;
- ``iphn``: both. An unset ``ip_weight`` / ``tau_plus`` takes the variant's script value.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks.pgd import pgd_ascent, uniform_noise
from ..checkpoint import unwrap
from ..data.augment import ADVCL_VIEW, crop_flip_view, high_frequency, simclr_view, to_float
from ..distributed import DistContext, all_gather_with_grad, local_slice
from ..settings import option
from .base import AInfoNCESettings, ContrastiveSettings, CosineSettings, Method, PGDSettings, TrainSettings
from .losses import asym_supcon_loss, pseudo_label_ce, supcon_loss

BN_SETS = ("normal", "pgd", "pgd_ce")
# the authors' shell scripts, per A-InfoNCE variant: the adversarial-clean weight (--adv_weight)
# and tau_plus (--tau_plus; IPHN keeps the code's default)
IP_WEIGHT = {"ip": 1.2, "hn": 1.0, "iphn": 0.7}
TAU_PLUS = {"hn": 0.12, "iphn": 0.1}


def contrastive_term(net, x_cl: Tensor, clean: list[Tensor], s, ctx: DistContext, *, attack: bool = False,
                     stop_grad: float | Tensor | None = None) -> Tensor:
    """SupCon over [z_cl, z1, z2, z_HFC] (x_cl through the "pgd" BN set), every rank's rows
    included; A-InfoNCE's loss when ``s.a_infonce`` is on (``attack``: the attack's form;
    ``stop_grad``: the inferior-positive degree of the training loss)."""
    z_cl = net.project(net.features(x_cl, "pgd"))
    features = all_gather_with_grad(torch.stack([z_cl, *clean], dim=1), ctx)
    variant = getattr(s, "a_infonce", "off")
    if variant == "off":
        return supcon_loss(features, s.temperature, s.base_temperature)
    weight = IP_WEIGHT[variant] if s.ip_weight is None else s.ip_weight
    hard = None if attack or "hn" not in variant else (TAU_PLUS[variant] if s.tau_plus is None else s.tau_plus, s.hn_beta)
    return asym_supcon_loss(features, s.temperature, s.base_temperature, adv_weight=weight,
                            stop_grad=None if attack else stop_grad, hard_negatives=hard)


def pseudo_label_term(net, x_ce: Tensor, targets: list[Tensor], reduction: str = "mean") -> Tensor:
    """The pseudo-label cross-entropy of x_ce (through the "pgd_ce" BN set), mean over heads."""
    return pseudo_label_ce(net.pseudo_logits(net.features(x_ce, "pgd_ce")), targets, reduction=reduction)


def attack_objective(net, x_cl: Tensor, x_ce: Tensor | None, clean: list[Tensor], targets: list[Tensor] | None,
                     s, ctx: DistContext = DistContext()) -> Tensor:
    """The loss both adversarial views ascend at every PGD step: the contrastive term of x_cl
    plus ``ce_weight`` times the pseudo-label CE of x_ce summed over the batch."""
    loss = contrastive_term(net, x_cl, clean, s, ctx, attack=True)
    if x_ce is not None:
        loss = loss + s.ce_weight * pseudo_label_term(net, x_ce, targets, reduction="sum")
    return loss


def attack(net, x_org: Tensor, clean: list[Tensor], targets: list[Tensor] | None, gen: torch.Generator, s, *,
           noise: Tensor | None = None, ctx: DistContext = DistContext()) -> tuple[Tensor, Tensor | None]:
    """The adversarial views ``(x_cl, x_ce)``; ``x_ce`` is None without pseudo labels. ``s`` holds
    the method's settings (the attack budget, temperatures, ``ce_weight``).

    ``clean`` holds the projections [z1, z2, z_HFC] of the clean views (used detached).
    ``noise`` (2, B, ...) in [-1, 1] is the random start (drawn from ``gen`` when not given).
    Under torchrun the contrastive loss inside the attack also sees every rank's projections,
    as one process holding the global batch would.
    """
    if noise is None:
        noise = uniform_noise(x_org, gen, count=2)
    clean = [z.detach() for z in clean]
    starts = (x_org + s.eps * noise[0],) + ((x_org + s.eps * noise[1],) if targets is not None else ())

    def objective(x_cl, x_ce=None):
        return attack_objective(net, x_cl, x_ce, clean, targets, s, ctx)

    x_cl, *x_ce = pgd_ascent(objective, starts, (x_org,) * len(starts), s.eps, s.pgd_steps, s.pgd_step_size)
    return x_cl, (x_ce[0] if x_ce else None)


class AdvCL(Method):
    """``step`` computes the full AdvCL loss of one batch; the engine does backward/optimizer."""

    name = "advcl"
    aliases = ("a-infonce",)  # AdvCL trained with A-InfoNCE's loss (--a-infonce); finetuned as AdvCL
    summary = "AdvCL (Fan et al., NeurIPS 2021): x_cl/x_ce attacks, HFC view, pseudo-label heads"

    class Settings(TrainSettings, PGDSettings, ContrastiveSettings, CosineSettings, AInfoNCESettings):
        ce_weight: float = option(0.2, "Weight of the pseudo-label term.", ge=0)
        hfc_radius: float = option(8.0, "Radius of the high-frequency view's low-pass cut.", ge=0)
        pseudo_labels: Path | None = option(None, "Labels file from `advcl pseudo-labels` (without it: no pseudo-label term).",
                                            input="labels")
        stpg_adaptive_epochs: int = option(30, "A-InfoNCE ip: epochs measuring the clean-adversarial feature distance "
                                               "before the degree adapts to it (0: a fixed degree).", ge=0)
        stpg_d_min: float = option(0.4, "A-InfoNCE ip: below this distance the degree is 0.5.", ge=0)

    def __init__(self, settings, *, n_images: int, device: torch.device | str = "cpu", inputs: dict | None = None):
        super().__init__(settings, n_images=n_images, device=device, inputs=inputs)
        self.hfc_radius = settings.hfc_radius
        self.labels: Tensor | None = None
        self.ks: tuple[int, ...] = ()
        pl = self.inputs.get("pseudo_labels")
        if pl is not None:
            self.labels, self.ks = pl.stacked().to(self.device), pl.ks
            made_for = str(pl.meta.get("dataset", "?"))
            if made_for.lower() != str(settings.dataset).lower():
                self.notes.append(f"the pseudo labels were made for '{made_for}', not '{settings.dataset}'")
        else:
            self.notes.append(
                "no --pseudo-labels given: AdvCL trains without the pseudo-label term "
                "(make labels with `advcl pseudo-labels --encoder CKPT`)"
            )
        self.epoch = 0
        # A-InfoNCE's adaptive stop-gradient: the distance accumulated over its first epochs (sum, count)
        self.distance = torch.zeros(2, dtype=torch.float64, device=self.device)

    @property
    def checkpoint_name(self) -> str:
        """AdvCL with A-InfoNCE's loss records "a-infonce"."""
        return self.name if self.settings.a_infonce == "off" else "a-infonce"

    @property
    def adaptive(self) -> bool:
        return "ip" in self.settings.a_infonce and self.settings.stpg_adaptive_epochs > 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state(self) -> dict[str, Tensor]:
        return {"stpg_distance": self.distance} if self.adaptive else {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if self.adaptive:
            self.distance = tensors["stpg_distance"].to(self.device, torch.float64)

    def model_config(self, arch: str) -> dict:
        return {"bn_sets": BN_SETS, "proj_dim": 128, "pseudo_ks": self.ks}

    def views(self, batch: Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float32, *,
              return_params: bool = False):
        """x1, x2 (SimCLR, ``ADVCL_VIEW``), x_org (crop + flip), x_HFC (high-frequency part of
        x_org), in ``dtype``; with ``return_params`` also ``{"x1", "x2", "x_org"}`` -> the
        parameters drawn for each (x_HFC is a function of x_org)."""
        x = to_float(batch, dtype)
        x1, p1 = simclr_view(x, gen, ADVCL_VIEW, return_params=True)
        x2, p2 = simclr_view(x, gen, ADVCL_VIEW, return_params=True)
        x_org, po = crop_flip_view(x, gen, return_params=True)
        views = (x1, x2, x_org, high_frequency(x_org, self.hfc_radius))
        return (views, {"x1": p1, "x2": p2, "x_org": po}) if return_params else views

    def targets(self, indices: Tensor) -> list[Tensor] | None:
        return None if self.labels is None else list(self.labels[:, indices].unbind(0))

    def step(self, model, batch: Tensor, indices: Tensor, gen: torch.Generator, ctx: DistContext = DistContext()):
        """The loss of one global batch: every rank draws the same views and random starts for all
        of it and keeps its own slice. The views are in the model's float dtype."""
        views = self.views(batch, gen, next(unwrap(model).parameters()).dtype)
        noise = local_slice(uniform_noise(views[2], gen, count=2), ctx, dim=1)
        views = tuple(local_slice(v, ctx) for v in views)
        return self.loss(model, views, local_slice(indices, ctx), gen, ctx, noise=noise)

    def loss(self, model, views, indices: Tensor, gen: torch.Generator, ctx: DistContext = DistContext(), noise=None):
        """The step's loss given its views (x1, x2, x_org, x_HFC); ``gen`` draws the random start
        unless ``noise`` is given."""
        net = unwrap(model)
        x1, x2, x_org, x_hfc = views
        targets = self.targets(indices)
        clean = [net.project(net.features(v, "normal")) for v in (x1, x2, x_hfc)]
        x_cl, x_ce = attack(net, x_org, clean, targets, gen, self.settings, noise=noise, ctx=ctx)
        degree = self.stop_grad_degree(net, x_org, x_cl, ctx) if "ip" in self.settings.a_infonce else None
        contrast = contrastive_term(net, x_cl, clean, self.settings, ctx, stop_grad=degree)
        loss, terms = contrast, {"contrast": contrast.detach()}
        if degree is not None:
            terms["stpg_degree"] = torch.as_tensor(degree, dtype=contrast.dtype, device=contrast.device)
        if x_ce is not None:
            ce = pseudo_label_term(net, x_ce, targets)
            loss = loss + self.settings.ce_weight * ce
            terms["pseudo_ce"] = ce.detach()
        return loss, terms

    def stop_grad_degree(self, net, x_org: Tensor, x_cl: Tensor, ctx: DistContext = DistContext()) -> float | Tensor:
        """A-InfoNCE's inferior-positive degree for this step (see the module's docstring); in its
        first ``stpg_adaptive_epochs`` epochs it accumulates the distance and returns ``stpg_degree``.
        Computed on the device, without a host sync."""
        s = self.settings
        if not self.adaptive:
            return s.stpg_degree
        with torch.no_grad():
            d = F.pairwise_distance(net.features(x_org, "normal"), net.features(x_cl, "normal"))
            d = all_gather_with_grad(d, ctx)
        mean = d.mean().to(torch.float64)
        if self.epoch + 1 <= s.stpg_adaptive_epochs:
            self.distance = self.distance + torch.stack([mean * len(d), mean.new_tensor(len(d))])
            return s.stpg_degree
        avg = self.distance[0] / self.distance[1]
        ramp = (avg - mean) / (avg - s.stpg_d_min) * (0.5 - s.stpg_degree) + s.stpg_degree
        return torch.where(mean > avg, s.stpg_degree, torch.where(mean < s.stpg_d_min, 0.5, ramp))
