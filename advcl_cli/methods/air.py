"""ACL-AIR (Xu et al., NeurIPS 2023, "Enhancing adversarial contrastive learning via adversarial
invariant regularization"): ACL plus two regularisers on an un-augmented view, as the authors'
``pretraining.py --ACL_DS`` and ``AIR.py`` (GodXuxilie/Enhancing_ACL_via_AIR) compute them.

One step:

- ACL's two augmented views x1, x2 (``ViewSpec.acl()``: the authors' transform at strength 1,
  bicubic crop scale (0.1, 1)) and the un-augmented image x_o (their ``ToTensor()`` of the
  image), in [0, 1];
- ACL's attack (``acl.contrastive_attack``: both views from x + U(-eps, eps), 5 steps of 2/255
  on the NT-Xent of the pair through "pgd", eval mode);
- in train mode, in the authors' order: the attacked pair through "pgd" (one batch of 2B), the
  clean pair through "normal" (one batch of 2B), then x_o through "normal" in a batch of its own
  (B images: its batch-norm statistics are x_o's alone); backbone and projection head each
  through the named BN set; no projection is detached, so gradients flow through x_o too;
- with z the L2-normalised 512-d projections, tau the NT-Xent temperature (0.5) and softmaxes
  over the batch index k of d_k(a, b) = a_k . b_k / tau (``losses.standard_invariance`` and
  ``losses.adversarial_invariance``, which pass probabilities where ``kl_div`` expects
  log-probabilities, exactly as the authors' code does):
  loss = (1 - w) NT-Xent(x1, x2) + (1 + w) NT-Xent(x~1, x~2) + 0.5 SIR + 0.5 AIR, not halved,
  with w = ``adversarial_weight()``: 0 for ACL-AIR (the authors' code without ``--DynAug``);
- LARS and ACL's per-step cosine, as ACL.

Under torchrun the NT-Xent terms and the softmaxes over k see the global batch: the five
projections of every image are gathered (with gradients) from every rank before the loss, so
N processes compute what one does. Batch norm normalises x_o over the global batch.

DynACL-AIR (``DynACLAIR``, ``--method dynacl-air``; the authors' ``--ACL_DS --DynAug``) is
this step with the dynamic augmentation: the views at DynACL's strength s = 1 - 50 floor(e /
50) / epochs (0-based e; bicubic, as the authors' AIR transform, where DynACL's own crop is
bilinear), w = (2/3)(1 - s), which steps with s (DynACL's own weight steps one epoch earlier);
as in their code, neither a momentum encoder nor DynACL's per-epoch cosine (ACL's per-step
one). Its encoders finetune with DynACL's protocol.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..checkpoint import unwrap
from ..data.augment import ViewSpec, to_float
from ..distributed import DistContext, all_gather_with_grad
from ..settings import option
from .acl import ACL, LINEAR, pair_projections
from .dynacl import DynACL, block_strength
from .losses import adversarial_invariance, nt_xent, standard_invariance


def air_loss(z: Tensor, *, temperature: float, adv_weight: float = 0.0, sir_weight: float = 0.5,
             air_weight: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """AIR's loss of the projections ``z`` (B, 5, D) of [x1, x2, x_o, x~1, x~2] (the whole batch):
    (1 - w) clean NT-Xent + (1 + w) adversarial NT-Xent + SIR and AIR at their weights."""
    z1, z2, z_o, za1, za2 = z.unbind(1)
    clean, adv = nt_xent(z[:, :2], temperature), nt_xent(z[:, 3:], temperature)
    sir = standard_invariance(z1, z2, z_o, temperature)
    air = adversarial_invariance(z1, z2, z_o, za1, za2, temperature)
    loss = (1 - adv_weight) * clean + (1 + adv_weight) * adv + sir_weight * sir + air_weight * air
    return loss, {"clean": clean.detach(), "adv": adv.detach(), "sir": sir.detach(), "air": air.detach()}


class AIR(ACL):
    """``step`` computes ACL-AIR's loss of one batch; the engine does backward and LARS."""

    name = "air"
    summary = "ACL-AIR (Xu et al., NeurIPS 2023): ACL + SIR and AIR regularisers on the un-augmented view"
    aliases = ("acl-air",)  # its checkpoints' method
    finetune_protocol = {  # the RobustSSL benchmark's ACL-AIR settings (its ACL_IR): ACL's, other rates
        "slf": {**LINEAR, "lr": {"cifar10": 0.005, "cifar100": 0.1, "*": 0.01}},
        "alf": {**LINEAR, "lr": {"cifar100": 0.1, "*": 0.01}},
        "aff": ACL.finetune_protocol["aff"],
    }

    class Settings(ACL.Settings):
        sir_weight: float = option(0.5, "Weight of SIR, the standard invariant regulariser (the authors' lambda1).", ge=0)
        air_weight: float = option(0.5, "Weight of AIR, the adversarial invariant regulariser (the authors' lambda2).", ge=0)

    @property
    def checkpoint_name(self) -> str:
        return "acl-air"

    def adversarial_weight(self) -> float:
        """w in (1 - w) L_clean + (1 + w) L_adv: 0 for ACL-AIR (DynACL-AIR: (2/3)(1 - s))."""
        return 0.0

    def views(self, batch: Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float32, *,
              return_params: bool = False):
        """ACL's two views, then the un-augmented image x_o (it draws nothing)."""
        drawn = super().views(batch, gen, dtype, return_params=return_params)
        x_o = to_float(batch, dtype)
        return ((*drawn[0], x_o), drawn[1]) if return_params else (*drawn, x_o)

    def loss(self, model, views, noise: Tensor, ctx: DistContext = DistContext()):
        """The loss of the (local) views ``(x1, x2, x_o)`` with the random start ``noise``."""
        net = unwrap(model)
        x1, x2, x_o = views
        a1, a2 = self.attack(net, x1, x2, noise, ctx)
        net.train()
        za1, za2 = pair_projections(net, a1, a2, "pgd")
        z1, z2 = pair_projections(net, x1, x2, "normal")
        z_o = net.project(net.features(x_o, "normal"), "normal")  # a batch of its own, after the pair
        z = all_gather_with_grad(torch.stack([z1, z2, z_o, za1, za2], dim=1), ctx)
        s = self.settings
        return air_loss(z, temperature=s.temperature, adv_weight=self.adversarial_weight(),
                        sir_weight=s.sir_weight, air_weight=s.air_weight)


class DynACLAIR(AIR):
    """DynACL-AIR: AIR with DynACL's augmentation-strength schedule and w = (2/3)(1 - s)."""

    name = "dynacl-air"
    summary = "DynACL-AIR (Xu et al., NeurIPS 2023): AIR with DynACL's annealed augmentation"
    aliases = ()
    finetune_protocol = {  # the RobustSSL benchmark's DynACL-AIR settings (the --mode SLF value: 5 epochs on CIFAR-10)
        "slf": {**LINEAR, "lr": {"cifar100": 0.1, "*": 0.01}, "epochs": {"cifar10": 5, "*": 25}},
        "alf": {**LINEAR, "lr": {"cifar100": 0.1, "*": 0.01}},
        "aff": DynACL.finetune_protocol["aff"],
    }

    class Settings(AIR.Settings):
        strength_block: int = option(50, "Epochs per augmentation strength (the authors' reload_frequency).", ge=1)
        weight_swap: float = option(2 / 3, "The adversarial weight w = weight-swap x (1 - strength) (the authors' LAMBDA).",
                                    ge=0)

    epoch = 0

    @property
    def checkpoint_name(self) -> str:
        return "dynacl-air"

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def strength(self) -> float:
        """The augmentation strength of the current epoch (DynACL's blocks)."""
        return block_strength(self.epoch, self.settings.strength_block, self.settings.epochs)

    def adversarial_weight(self) -> float:
        return self.settings.weight_swap * (1 - self.strength())

    def view_spec(self) -> ViewSpec:
        return dataclasses.replace(ViewSpec.dynacl(self.strength()), interpolation="bicubic")
