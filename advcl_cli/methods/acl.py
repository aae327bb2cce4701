"""ACL (Jiang et al., NeurIPS 2020), the dual-stream ("DS") variant of the authors'
``train_simCLR.py --ACL_DS``.

One step, matched to the authors' code:

- two SimCLR views of every image (``ViewSpec.acl()``: RandomResizedCrop(32, scale (0.1, 1),
  bicubic), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2), in [0, 1];
  the model normalises them inside with ImageNet's mean and std;
- the attack (``contrastive_attack``): both views start at x + U(-eps, eps) (not clamped),
  then ``pgd_steps`` signed-gradient steps of ``pgd_step_size`` ascending the NT-Xent of the
  perturbed pair through the "pgd" BN sets (backbone and projection head) with the model in
  **eval** mode, each step projected onto the L-inf ball around x and clamped to [0, 1];
- the loss, in train mode: (NT-Xent of the clean pair through "normal" + NT-Xent of the
  attacked pair through "pgd") / 2, each pair as one batch of 2B through its BN set, so batch
  norm sees both views together, as the authors' interleaved batch does;
- NT-Xent at temperature 0.5 over the 2B L2-normalised 512-d projections (ACL's three-layer
  head, a BN per set), each vector's positive the other view of its image, its denominator
  the 2B - 1 others;
- LARS (lr 5.0, momentum 0.9, weight decay 1e-6 on every parameter, trust coefficient 1e-3),
  batch 512, 1000 epochs, cosine stepped per iteration after a 10-epoch linear warm-up from
  0, down to 1e-6 (``optim.CosineAnnealing``).

Under torchrun every rank draws the views and random starts of the whole global batch and
keeps its slice; the NT-Xent (in the attack too) sees every rank's projections, and batch norm
the global batch, so N processes compute what one does. The attack runs in eval mode: its
BN uses running statistics and needs no synchronisation.

The module's pieces (views, attack, the two NT-Xent terms) are what DynACL and AIR build on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attacks.pgd import pgd_ascent, uniform_noise
from ..checkpoint import unwrap
from ..data.augment import ViewSpec, simclr_view, to_float
from ..distributed import DistContext, all_gather_with_grad, local_slice
from ..models import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from ..optim import CosineAnnealing
from ..settings import option, with_defaults
from .base import Method, PGDSettings, TrainSettings
from .losses import nt_xent
from .rcs import CoresetSettings

BN_SETS = ("normal", "pgd")


def pair_projections(net, x1: Tensor, x2: Tensor, bn: str) -> tuple[Tensor, Tensor]:
    """The projections of both views through BN set ``bn``, as one batch of 2B."""
    z = net.project(net.features(torch.cat([x1, x2]), bn), bn)
    return z[: x1.shape[0]], z[x1.shape[0]:]


def pair_loss(net, x1: Tensor, x2: Tensor, bn: str, temperature: float, ctx: DistContext) -> Tensor:
    """NT-Xent of the pair through ``bn``, over every rank's images."""
    z1, z2 = pair_projections(net, x1, x2, bn)
    return nt_xent(all_gather_with_grad(torch.stack([z1, z2], dim=1), ctx), temperature)


def contrastive_attack(net, x1: Tensor, x2: Tensor, noise: Tensor, *, eps: float, steps: int, step_size: float,
                       temperature: float, ctx: DistContext = DistContext(), objective=None) -> tuple[Tensor, Tensor]:
    """ACL's PGD on the NT-Xent of the pair through "pgd" in eval mode (``net`` is left in eval
    mode) from ``x + eps * noise`` (``noise`` (2, B, ...) in [-1, 1]). ``objective(a1, a2)``, if
    given, is the loss ascended instead (DynACL: the second view through its momentum encoder)."""
    net.eval()
    objective = objective or (lambda v1, v2: pair_loss(net, v1, v2, "pgd", temperature, ctx))
    return pgd_ascent(objective, (x1 + eps * noise[0], x2 + eps * noise[1]), (x1, x2), eps, steps, step_size)


# The ACL family's SLF/ALF in the RobustSSL benchmark: batch 512, or 128 on STL-10 at 32x32;
# decay at 10 and 20. Its AFF keeps both BN sets, except from CIFAR-10 to STL-10 (run with
# --dualBN 0 in its run_vanilla_tune.sh).
LINEAR = {"batch_size": {"stl10": 128, "*": 512}, "milestones": [10, 20]}
DUAL_BN = {"cifar10->stl10": False, "*": True}


class ACL(Method):
    """``step`` computes ACL's loss of one batch; the engine does backward and LARS."""

    name = "acl"
    summary = "ACL (Jiang et al., NeurIPS 2020), dual stream: clean + adversarial NT-Xent, BN sets normal/pgd"
    aliases = ("acl-rcs",)  # trained on an RCS coreset (--coreset)
    finetune_protocol = {  # the RobustSSL benchmark's ACL settings (its setup_hyperparameter)
        "slf": {**LINEAR, "lr": {"cifar100": 0.05, "*": 0.01}},
        "alf": {**LINEAR, "lr": {"cifar100": 0.05, "*": 0.01}},
        "aff": {"batch_size": 128, "lr": 0.1, "epochs": 100, "milestones": [40, 60], "dual_bn": DUAL_BN},
    }

    class Settings(with_defaults(TrainSettings, "ACLTraining", optimizer="lars", lr=5.0, weight_decay=1e-6,
                                 warmup_epochs=10), PGDSettings, CoresetSettings):
        temperature: float = option(0.5, "NT-Xent temperature.", gt=0)
        min_lr: float = option(1e-6, "The cosine decays to this learning rate.", ge=0)

    @property
    def checkpoint_name(self) -> str:
        """ACL and DynACL trained on an RCS coreset record "acl-rcs" / "dynacl-rcs"."""
        return f"{self.name}-rcs" if self.settings.coreset else self.name

    def model_config(self, arch: str) -> dict:
        dim = ModelConfig(arch).feature_dim  # the projection head stays at the feature width (512)
        return {"bn_sets": BN_SETS, "proj_dim": dim, "proj_head": "mlp3", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def schedule(self):
        s = self.settings
        warmup = 10 if s.warmup_epochs is None else s.warmup_epochs
        return CosineAnnealing(base_lr=s.lr, epochs=s.epochs, warmup_epochs=min(warmup, s.epochs), min_lr=s.min_lr, per="step")

    def view_spec(self) -> ViewSpec:
        """The views' augmentation (DynACL changes it per epoch)."""
        return ViewSpec.acl()

    def views(self, batch: Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float32, *,
              return_params: bool = False):
        """The views ``loss`` takes, in ``dtype`` (with their drawn parameters if asked): ACL's
        two augmented views (AIR adds the un-augmented image)."""
        x, spec = to_float(batch, dtype), self.view_spec()
        (x1, p1), (x2, p2) = (simclr_view(x, gen, spec, return_params=True) for _ in range(2))
        return ((x1, x2), {"x1": p1, "x2": p2}) if return_params else (x1, x2)

    def step(self, model, batch: Tensor, indices: Tensor, gen: torch.Generator, ctx: DistContext = DistContext()):
        """One global batch: every rank draws all of its views and random starts, keeps its slice."""
        views = self.views(batch, gen, next(unwrap(model).parameters()).dtype)
        noise = local_slice(uniform_noise(views[0], gen, count=2), ctx, dim=1)
        return self.loss(model, tuple(local_slice(v, ctx) for v in views), noise, ctx)

    def attack(self, net, x1: Tensor, x2: Tensor, noise: Tensor, ctx: DistContext) -> tuple[Tensor, Tensor]:
        s = self.settings
        return contrastive_attack(net, x1, x2, noise, eps=s.eps, steps=s.pgd_steps, step_size=s.pgd_step_size,
                                  temperature=s.temperature, ctx=ctx)

    def loss(self, model, views, noise: Tensor, ctx: DistContext = DistContext()):
        """The loss of the (local) views ``(x1, x2)`` with the random start ``noise`` (2, B, ...)."""
        net = unwrap(model)
        x1, x2 = views
        a1, a2 = self.attack(net, x1, x2, noise, ctx)
        net.train()
        adv = pair_loss(net, a1, a2, "pgd", self.settings.temperature, ctx)
        clean = pair_loss(net, x1, x2, "normal", self.settings.temperature, ctx)
        loss = (clean + adv) / 2
        return loss, {"clean": clean.detach(), "adv": adv.detach()}
