"""RoCL (Kim, Tack & Hwang, NeurIPS 2020): adversarial self-supervised contrastive learning.

One step, matched to the authors' code (Kim-Minseon/RoCL ``src/``: ``rocl_train.py``,
``RepresentationAdv.get_loss`` in ``attack_lib.py``, ``pairwise_similarity`` and ``NT_xent`` in
``loss.py``, run with ``--advtrain_type Rep --loss_type sim --attack_to other --regularize_to
other --k 7``):

- two SimCLR views ``x1``, ``x2`` of every image (RandomResizedCrop(32) with torchvision's
  default scale (0.08, 1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2;
  the authors' jitter strength 0.5 times (0.8, 0.8, 0.8, 0.2)), in [0, 1], no normalisation;
- the instance-wise attack: ``x_adv`` starts at ``clamp(x1 + U(-eps, eps), 0, 1)`` and takes
  ``pgd_steps`` (7) signed-gradient steps of ``pgd_step_size`` (0.007, eps 0.0314) ascending
  RoCL's NT-Xent of the pair (x_adv, x2) (``losses.rocl_nt_xent``: its second factor of the
  similarity detached), each step clamped to [0, 1] and projected onto the eps-ball around x1
  (the two clips commute), with the model (backbone and projection head) in **eval** mode;
- in train mode, two forward passes, each one batch through the one BN set: the regulariser,
  RoCL's NT-Xent of (x_adv, x2) divided by ``reg_lambda`` (256, the authors' ``--lamda``),
  and the loss, RoCL's NT-Xent of the three views (x1, x2, x_adv) as one batch of 3B, where each
  image's three views are positives of each other; loss = NT-Xent(x1, x2, x_adv) + regulariser;
- the authors' CIFAR ResNet-18 with one BN set and RoCL's projection head (``mlp2-wide``:
  Linear(512, 2048) - ReLU - Linear(2048, 128));
- LARS (lr 0.1, momentum 0.9, weight decay 1e-6, trust coefficient 1e-3), batch 512 (the
  authors' 256 per GPU on 2 GPUs), 1000 epochs; the rate warms up to 15 x lr over 10 epochs
  and then follows a cosine over ``epochs`` (``optim.GradualWarmupCosine``).

Under torchrun every rank draws the views and random starts of the whole global batch and keeps
its slice; the three NT-Xent terms (the attack's too) see every rank's projections and BN the
global batch, so N processes compute what one does. The authors' attack and regulariser see each
GPU's 256 images only (their ``multi_gpu=False``), and their main loss all 512: advcl's attack
and regulariser see the global batch (the README says so).

A-InfoNCE (``--a-infonce ip|hn|iphn``, off by default; the authors' ``Asym-RoCL``: ``loss.py``
``NT_xent`` / ``NT_xent_HN``, ``shell/rocl-{IP,HN,IPHN}-cifar10.sh``) changes the three-view
loss only (the attack and the regulariser stay RoCL's): ``ip`` weighs each (clean anchor,
adversarial positive) term by ``ip_weight * stpg_degree`` (1 x 0.2) and each (adversarial
anchor, clean positive) term by ``ip_weight * (1 - stpg_degree)``; ``hn`` takes HCL's hard
negatives (``tau_plus`` 0.12, ``hn_beta`` 1); ``iphn`` both (see ``losses.rocl_nt_xent``).
There is no adaptive degree in the authors' RoCL code. Checkpoints record ``rocl-a-infonce``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attacks.pgd import pgd_ascent, uniform_noise
from ..checkpoint import unwrap
from ..data.augment import ViewSpec, simclr_view, to_float
from ..distributed import DistContext, all_gather_with_grad, local_slice
from ..optim import GradualWarmupCosine
from ..settings import option, with_defaults
from .base import AInfoNCESettings, Method, PGDSettings, TrainSettings
from .losses import rocl_nt_xent

VIEW = ViewSpec(scale=(0.08, 1.0))


def views_loss(net, views: list[Tensor], temperature: float, ctx: DistContext, **asym) -> Tensor:
    """RoCL's NT-Xent of the views of every image, all views as one batch through the one BN set,
    over every rank's projections (view-major); ``asym``: A-InfoNCE's arguments of ``rocl_nt_xent``."""
    z = net.project(net.features(torch.cat(views)))
    per_image = torch.stack(z.chunk(len(views)), dim=1)  # (B, V, D)
    gathered = all_gather_with_grad(per_image, ctx).transpose(0, 1)
    return rocl_nt_xent(gathered.reshape(-1, z.shape[1]), len(views), temperature, **asym)


class RoCL(Method):
    name = "rocl"
    aliases = ("rocl-a-infonce",)  # RoCL with A-InfoNCE's loss (--a-infonce)
    summary = "RoCL (Kim et al., NeurIPS 2020): x1 attacked against x2, three-view NT-Xent + regulariser"

    class Settings(with_defaults(TrainSettings, "RoCLTraining", optimizer="lars", lr=0.1, weight_decay=1e-6,
                                 warmup_epochs=10),
                   with_defaults(PGDSettings, "RoCLPGD", eps=0.0314, pgd_steps=7, pgd_step_size=0.007), AInfoNCESettings):
        temperature: float = option(0.5, "RoCL's NT-Xent temperature (loss, regulariser and attack).", gt=0)
        reg_lambda: float = option(256.0, "The regulariser NT-Xent(x_adv, x2) is divided by this (the authors' lamda).", gt=0)
        warmup_multiplier: float = option(15.0, "The warm-up rises to lr times this (the authors' lr_multiplier).", ge=1)

    def model_config(self, arch: str) -> dict:
        return {"bn_sets": ("normal",), "proj_dim": 128, "proj_head": "mlp2-wide"}

    @property
    def checkpoint_name(self) -> str:
        """RoCL with A-InfoNCE's loss records "rocl-a-infonce" (no published numbers)."""
        return self.name if self.settings.a_infonce == "off" else "rocl-a-infonce"

    def asym(self) -> dict:
        """A-InfoNCE's arguments of the three-view loss, as the authors' Asym-RoCL scripts
        (``--stop_grad --stpg_degree 0.2``, ``--HN --tau 0.12 --beta 1.0``, ``--adv_weight`` 1)."""
        s, variant = self.settings, self.settings.a_infonce
        w = 1.0 if s.ip_weight is None else s.ip_weight
        return {"adv_weights": (w * s.stpg_degree, w * (1 - s.stpg_degree)) if "ip" in variant else None,
                "hard_negatives": (0.12 if s.tau_plus is None else s.tau_plus, s.hn_beta) if "hn" in variant else None}

    def schedule(self):
        s = self.settings
        warmup = 10 if s.warmup_epochs is None else s.warmup_epochs
        return GradualWarmupCosine(base_lr=s.lr, epochs=s.epochs, multiplier=s.warmup_multiplier,
                                   warmup_epochs=min(warmup, s.epochs))

    def views(self, batch: Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float32):
        """x1, x2 and the attack's U(-1, 1) start, in ``dtype``."""
        x = to_float(batch, dtype)
        x1, x2 = simclr_view(x, gen, VIEW), simclr_view(x, gen, VIEW)
        return x1, x2, uniform_noise(x1, gen)

    def step(self, model, batch: Tensor, indices: Tensor, gen: torch.Generator, ctx: DistContext = DistContext()):
        """One global batch: every rank draws all of its views and starts, keeps its slice."""
        views = self.views(batch, gen, next(unwrap(model).parameters()).dtype)
        return self.loss(model, *(local_slice(v, ctx) for v in views), ctx)

    def attack(self, net, x1: Tensor, x2: Tensor, noise: Tensor, ctx: DistContext = DistContext()) -> Tensor:
        """x1 attacked against x2 from ``clamp(x1 + eps * noise, 0, 1)``, ``net`` in eval mode (left so)."""
        s = self.settings
        net.eval()
        start = (x1 + s.eps * noise).clamp(0, 1)
        (x_adv,) = pgd_ascent(lambda a: views_loss(net, [a, x2], s.temperature, ctx), (start,), (x1,),
                              s.eps, s.pgd_steps, s.pgd_step_size)
        return x_adv

    def loss(self, model, x1: Tensor, x2: Tensor, noise: Tensor, ctx: DistContext = DistContext()):
        """The loss of the (local) views with the attack's start ``noise`` in [-1, 1]."""
        s, net = self.settings, unwrap(model)
        x_adv = self.attack(net, x1, x2, noise, ctx)
        net.train()
        reg = views_loss(net, [x_adv, x2], s.temperature, ctx) / s.reg_lambda
        contrast = views_loss(net, [x1, x2, x_adv], s.temperature, ctx, **self.asym())
        return contrast + reg, {"nt_xent": contrast.detach(), "reg": reg.detach()}
