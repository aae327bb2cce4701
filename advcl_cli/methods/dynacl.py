"""DynACL (Luo et al., ICLR 2023): ACL with an augmentation schedule that anneals from strong
to weak views, a clean/adversarial weight that shifts toward the adversarial term, and (in the
authors' code) a momentum encoder for the second view. DynACL++ is DynACL followed by the
post-processing of ``advcl lpaft`` (``engine/lpaft.py``).

Matched to the authors' ``train_DynACL.py`` with ``models/resnet_multi_bn.py``
(``resnet18_momentum``) and ``utils.py`` (PKU-ML/DYNACL). Epochs ``e`` are 0-based here (the
code counts ``e + 1``), ``E`` epochs in all, ``K`` the block (``--strength-block``, the code's
``reload_frequency``, 50):

- augmentation strength ``s = 1 - K * floor(e / K) / E``, constant for blocks of ``K`` epochs
  (the code rebuilds its loader at 1-based epochs 1, 51, 101, ... with ``1 - (epoch - 1) / E``):
  1.00, 0.95, ..., 0.05 for E = 1000. The views (``ViewSpec.dynacl(s)``): RandomResizedCrop(32,
  scale (1 - 0.9 s, 1)) with torchvision's default bilinear interpolation, flip p 0.5 (not
  annealed), ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s) with p 0.8 s, grayscale p 0.2 s;
- the loss ``(L_clean * (2 - a) + L_adv * a) / 2`` with
  ``a = min(1 + floor((e + 1) / K) * (K / E) * swap, 2)`` (``swap`` = ``--weight-swap``, the
  code's ``swap_param`` 2/3): ``((1 - w) L_clean + (1 + w) L_adv) / 2`` with w from 0 to 2/3,
  which steps one epoch before ``s`` does (at 1-based epochs 50, 100, ...);
- ACL's attack (both views from x + U(-eps, eps), 5 PGD steps of 2/255 on the NT-Xent of the
  pair through "pgd", eval mode) and ACL's NT-Xent at temperature 0.5, the clean pair through
  "normal" and the attacked pair through "pgd", in train mode; adversarial pair first;
- LARS (lr 5.0, weight decay 1e-6), batch 512, 1000 epochs; the cosine stepped once per
  epoch (``optim.EpochWarmupCosine``: 10 warm-up epochs from lr / 10, down to 1e-6);
- the momentum encoder (``--momentum-encoder``, on by default, as in the authors' code): a copy
  of the network made at the start, never optimised. The first view of every pair goes through
  the trained network, the second through the momentum encoder, in the attack (eval mode) and
  in the loss (train mode, so each network's BN normalises its own view's batch of B and the
  momentum encoder's running statistics follow its own forward passes). After the step's
  forward passes and before the optimizer step, every parameter of the momentum encoder
  becomes ``0.99 k + 0.01 q`` (``--ema-decay``) of the trained network's ``q`` as it was for
  this step's forward passes; buffers are not averaged. The encoder saved is the momentum
  encoder (the code's ``model_encoder_k.pt``, which its ``assign_label.py`` and ``LPAFT.py``
  take);
- ``--no-momentum-encoder``: the version the AIR and RCS papers re-implemented: ACL's one
  network for both views (each pair as one batch of 2B), the network itself saved. The
  checkpoint's ``config.momentum_encoder`` says which ran.

Under torchrun the momentum encoder's BN layers are global-batch ones too, so its statistics
and outputs are those of one process, and its parameters stay identical on every rank (the EMA
of parameters that are identical after the gradient all-reduce).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..checkpoint import clean_state_dict, unwrap
from ..data.augment import ViewSpec
from ..distributed import DistContext, all_gather_with_grad, prepare_model
from ..errors import CheckpointError
from ..optim import EpochWarmupCosine
from ..settings import option
from .acl import ACL, DUAL_BN, LINEAR, contrastive_attack, pair_loss
from .losses import nt_xent

STATE_PREFIX = "momentum_encoder."


def split_pair_loss(q, k, x1: Tensor, x2: Tensor, bn: str, temperature: float, ctx: DistContext) -> Tensor:
    """NT-Xent of the pair with ``x1`` through network ``q`` and ``x2`` through ``k`` (each view
    a batch of its own), over every rank's images."""
    z1 = q.project(q.features(x1, bn), bn)
    z2 = k.project(k.features(x2, bn), bn)
    return nt_xent(all_gather_with_grad(torch.stack([z1, z2], dim=1), ctx), temperature)


def block_strength(epoch: int, block: int, epochs: int) -> float:
    """DynACL's augmentation strength of 0-based ``epoch``: 1 - block floor(epoch / block) / epochs,
    constant over blocks of ``block`` epochs (1.00, 0.95, ..., 0.05 for 50 of 1000)."""
    return 1 - (epoch // block) * block / epochs


@torch.no_grad()
def ema_update(k: torch.nn.Module, q: torch.nn.Module, decay: float) -> None:
    """Every parameter of ``k`` becomes ``decay * k + (1 - decay) * q`` (buffers untouched)."""
    for pk, pq in zip(k.parameters(), q.parameters()):
        pk.mul_(decay).add_(pq * (1 - decay))


class DynACL(ACL):
    name = "dynacl"
    summary = "DynACL (Luo et al., ICLR 2023): ACL with annealed views and a momentum encoder (DynACL++: advcl lpaft)"
    aliases = ("dynacl++", "dynacl-air++", "dynacl-rcs")  # their encoders finetune as DynACL's
    finetune_protocol = {  # the RobustSSL benchmark's DynACL(++) settings: ACL's SLF/ALF, AFF at batch 128
        "slf": ACL.finetune_protocol["slf"],
        "alf": ACL.finetune_protocol["alf"],
        "aff": {"batch_size": 128, "lr": 0.1, "milestones": [15, 20], "dual_bn": DUAL_BN},
    }
    alias_protocols = {  # the benchmark's DynACL-AIR++ settings (the --mode ALF value: 4 epochs on CIFAR-10)
        "dynacl-air++": {
            "slf": {**LINEAR, "lr": {"cifar100": 0.09, "stl10": 0.1, "*": 0.01}},
            "alf": {**LINEAR, "lr": {"cifar100": 0.1, "stl10": 0.1, "*": 0.01}, "epochs": {"cifar10": 4, "*": 25}},
            "aff": finetune_protocol["aff"],
        },
    }

    class Settings(ACL.Settings):
        momentum_encoder: bool = option(
            True, "Send the second view through a momentum encoder and save that encoder, as the authors' code does; "
            "--no-momentum-encoder: one network for both views (the AIR and RCS re-implementations).")
        ema_decay: float = option(0.99, "The momentum encoder's parameters: decay x theirs + (1 - decay) x the "
                                        "trained network's, once per step.", ge=0, le=1)
        strength_block: int = option(50, "Epochs per augmentation strength (the authors' reload_frequency).", ge=1)
        weight_swap: float = option(2 / 3, "The adversarial weight w = weight-swap x block / epochs x floor(epoch / block) "
                                           "(1-based epochs; at most 1), the authors' swap_param.", ge=0)

    def __init__(self, settings, *, n_images: int, device: torch.device | str = "cpu", inputs: dict | None = None):
        super().__init__(settings, n_images=n_images, device=device, inputs=inputs)
        self.epoch = 0
        self.momentum_net = None  # made by init_model
        self._global_bn = False

    # --- the schedules (epochs 0-based) --------------------------------------------------------
    def strength(self, epoch: int) -> float:
        """The augmentation strength of epoch ``epoch``."""
        return block_strength(epoch, self.settings.strength_block, self.settings.epochs)

    def adv_factor(self, epoch: int) -> float:
        """The factor ``a`` of the adversarial term (``2 - a`` of the clean one); ``w = a - 1``."""
        s = self.settings
        k = s.strength_block
        return min(1.0 + ((epoch + 1) // k) * (k / s.epochs) * s.weight_swap, 2)

    def schedule(self):
        s = self.settings
        warmup = 10 if s.warmup_epochs is None else s.warmup_epochs
        return EpochWarmupCosine(base_lr=s.lr, epochs=s.epochs, warmup_epochs=min(warmup, s.epochs), min_lr=s.min_lr)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_spec(self) -> ViewSpec:
        return ViewSpec.dynacl(self.strength(self.epoch))

    # --- the momentum encoder ------------------------------------------------------------------
    def init_model(self, model) -> None:
        """The momentum encoder starts as a copy of the freshly built network."""
        if self.settings.momentum_encoder:
            self.momentum_net = self.place(copy.deepcopy(unwrap(model)).requires_grad_(False))

    def second(self, ctx: DistContext):
        """The momentum encoder, with global-batch BN under torchrun (converted once)."""
        if self.momentum_net is None:
            raise RuntimeError("DynACL's momentum encoder is made by init_model(model) before the first step")
        if ctx.enabled and not self._global_bn:
            # new BN modules: their parameters are frozen again
            self.momentum_net = prepare_model(self.momentum_net, ctx).requires_grad_(False)
            self._global_bn = True
        return self.momentum_net

    def export(self, model):
        return self.momentum_net if self.momentum_net is not None else model

    def state(self) -> dict[str, Tensor]:
        if self.momentum_net is None:
            return {}
        return {STATE_PREFIX + k: v for k, v in clean_state_dict(self.momentum_net.state_dict()).items()}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if self.momentum_net is None:
            return
        own = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if not own:
            raise CheckpointError("the resume state holds no momentum encoder", "start over with --force")
        self.momentum_net.load_state_dict(own, strict=True)

    # --- the step ------------------------------------------------------------------------------
    def attack(self, net, x1: Tensor, x2: Tensor, noise: Tensor, ctx: DistContext) -> tuple[Tensor, Tensor]:
        if not self.settings.momentum_encoder:
            return super().attack(net, x1, x2, noise, ctx)
        s, k = self.settings, self.second(ctx)
        k.eval()
        return contrastive_attack(net, x1, x2, noise, eps=s.eps, steps=s.pgd_steps, step_size=s.pgd_step_size,
                                  temperature=s.temperature, ctx=ctx,
                                  objective=lambda a1, a2: split_pair_loss(net, k, a1, a2, "pgd", s.temperature, ctx))

    def loss(self, model, views, noise: Tensor, ctx: DistContext = DistContext()):
        """The loss of the (local) views ``(x1, x2)`` with the random start ``noise`` (2, B, ...)
        at the current epoch's weight; with the momentum encoder, its EMA step too."""
        net, s = unwrap(model), self.settings
        x1, x2 = views
        a1, a2 = self.attack(net, x1, x2, noise, ctx)
        net.train()
        if s.momentum_encoder:
            k = self.second(ctx).train()
            adv = split_pair_loss(net, k, a1, a2, "pgd", s.temperature, ctx)
            clean = split_pair_loss(net, k, x1, x2, "normal", s.temperature, ctx)
            ema_update(k, net, s.ema_decay)  # from this step's weights, before the optimizer moves them
        else:
            adv = pair_loss(net, a1, a2, "pgd", s.temperature, ctx)
            clean = pair_loss(net, x1, x2, "normal", s.temperature, ctx)
        a = self.adv_factor(self.epoch)
        loss = (clean * (2 - a) + adv * a) / 2
        extra = torch.tensor([self.strength(self.epoch), a - 1], device=loss.device)
        return loss, {"clean": clean.detach(), "adv": adv.detach(), "strength": extra[0], "adv_weight": extra[1]}
