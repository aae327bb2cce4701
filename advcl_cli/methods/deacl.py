"""DeACL (Zhang et al., ECCV 2022): adversarial contrastive learning by distillation.

Two stages. A standard (non-robust) SimCLR encoder, the teacher (``advcl pretrain --method
simclr``), then a student that starts from the teacher's weights and learns, in 100 epochs, to
keep the teacher's features on clean images and its own on attacked ones. The teacher's
forward pass, a 5-step attack of one view and one training pass of two views per image, for a
tenth of ACL's epochs: about a twentieth of ACL's compute beyond the teacher.

One step, matched to the authors' code (pantheon5100/DeACL, ``MoCoV2KDAT.training_step`` and
``generate_training_AE`` in ``solo/methods/mocov2_distillation_AT.py`` with
``BaseDistillationATMethod`` in ``solo/methods/base_for_adversarial_training.py``, run by
``bash_files/DeACL_cifar10_resnet18.sh``):

- one weak view per image: ``x`` = RandomCrop(padding 4, zeros) + horizontal flip, [0, 1];
- the teacher's backbone feature ``t`` of ``x``, with the teacher in eval mode and frozen (it
  is never updated, by the optimizer or by BN statistics);
- the losses use backbone features: the authors' run sets the projector to the identity for
  the student and the teacher (``projector_ablation = "remove"``), so the student has no
  projection head and the teacher's is not used;
- ``x_adv`` starts at ``x + U(-eps, eps)`` (not clamped at the start) and takes ``pgd_steps``
  signed-gradient steps of ``pgd_step_size`` ascending ``-sum cos(student(x_adv), t)``, each
  followed by the projection onto the L-inf ball around ``x`` and a clamp to [0, 1]; the
  student is in eval mode during the attack (BN running statistics) and back in train mode
  after it. Gradients are taken with respect to the input only;
- the student, in train mode, sees ``x`` and ``x_adv`` as one concatenated batch (its single
  BN set normalises with the statistics of both); with ``s = student(x)``,
  ``s_adv = student(x_adv)``: loss = ``-mean cos(s, t) - adv_weight * mean cos(s_adv, s)``,
  with gradients through both ``s`` and ``s_adv`` (``adv_weight`` 2, the authors' ``trades_k``);
- the student has one BN set, as the authors' (a torchvision ResNet-18 with plain BN): the
  teacher's first set; the rest of its network is the teacher's too (its normalisation of the
  inputs, none for advcl's SimCLR; its stem, padding 2 for solo-learn's SimCLR), so that at
  step 0 the student is the teacher;
- schedule: SGD lr 0.5, momentum 0.9, weight decay 5e-4, batch 256, 100 epochs; solo-learn's
  warm-up + cosine stepped per epoch (``optim.LinearWarmupCosine``: 10 warm-up epochs from
  0.003, cosine to 0).

The authors also train an online linear classifier on the student's detached features (in eval
mode, so it changes no backbone weight or statistic), as a monitor; it needs labels and is left
out. Under torchrun every rank draws the views and random starts of the whole global batch and
keeps its slice: the cosine terms are per-sample means, so the average of the ranks' gradients
(and the student's global-batch BN) is the one-process gradient without any gather; the teacher
and the attack use running statistics, so they need no synchronisation either.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks.pgd import pgd_ascent, uniform_noise
from ..checkpoint import unwrap
from ..data.augment import crop_flip_view, to_float
from ..distributed import DistContext, local_slice
from ..errors import UsageError
from ..models import backbone_with_bn_set
from ..optim import LinearWarmupCosine
from ..settings import option, with_defaults
from .base import CosineSettings, Method, PGDSettings, TrainSettings

TEACHER_HINT = "train one first: enc=$(advcl pretrain --method simclr -d DATASET), then add --teacher $enc"


def attack(net, x: Tensor, target: Tensor, noise: Tensor, s, bn: str | None = None) -> Tensor:
    """``x_adv`` pushing the student's feature away from the teacher's ``target``: PGD (``s``: the
    method's settings) from ``x + eps * noise`` on ``-sum cos(net(x_adv), target)``, with ``net``
    in eval mode (its mode is restored after)."""
    was_training = net.training
    net.eval()
    try:
        (x_adv,) = pgd_ascent(lambda a: -F.cosine_similarity(net.features(a, bn), target, dim=1).sum(),
                              (x + s.eps * noise,), (x,), s.eps, s.pgd_steps, s.pgd_step_size)
    finally:
        net.train(was_training)
    return x_adv


def deacl_loss(s_clean: Tensor, s_adv: Tensor, target: Tensor, adv_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``-mean cos(s_clean, target) - adv_weight * mean cos(s_adv, s_clean)`` and its two
    similarities."""
    cos_teacher = F.cosine_similarity(s_clean, target, dim=1).mean()
    cos_adv = F.cosine_similarity(s_adv, s_clean, dim=1).mean()
    loss = -cos_teacher - adv_weight * cos_adv
    return loss, {"cos_teacher": cos_teacher.detach(), "cos_adv": cos_adv.detach()}


class DeACL(Method):
    name = "deacl"
    summary = "DeACL (Zhang et al., ECCV 2022): a robust student distilled from a SimCLR --teacher"

    class Settings(with_defaults(TrainSettings, "DeACLTraining", epochs=100, batch_size=256, lr=0.5, weight_decay=5e-4,
                                 warmup_epochs=10),
                   PGDSettings, with_defaults(CosineSettings, "DeACLCosine", warmup_from=0.003, min_lr_ratio=0.0)):
        teacher: Path | None = option(
            None, "The SimCLR encoder to distil (from `advcl pretrain --method simclr`); the student starts from "
            "its weights. DeACL costs about a twentieth of ACL's compute beyond the teacher.",
            input="checkpoint", metavar="CKPT")
        adv_weight: float = option(2.0, "Weight of -cos(student(x_adv), student(x)) (the authors' trades_k).", ge=0)

    # the RobustSSL protocol for DeACL (SLF/ALF batch 512 lr 0.01, AFF batch 128 lr 0.1, decay
    # at 15 and 20) is the default one: nothing differs
    finetune_protocol = {}

    def __init__(self, settings, *, n_images: int, device: torch.device | str = "cpu", inputs: dict | None = None):
        super().__init__(settings, n_images=n_images, device=device, inputs=inputs)
        ckpt = self.inputs.get("teacher")
        if ckpt is None:
            raise UsageError("DeACL needs a teacher encoder: --teacher is missing", TEACHER_HINT)
        meta = ckpt.meta
        if meta.kind != "encoder":
            raise UsageError(f"--teacher {ckpt.path} is a {meta.kind} checkpoint; DeACL distils an encoder", TEACHER_HINT)
        if meta.arch != settings.arch:
            raise UsageError(f"the teacher is a {meta.arch}, the student would be a {settings.arch} "
                             "(the student starts from the teacher's weights)", f"add --arch {meta.arch}")
        if meta.method != "simclr":
            self.notes.append(f"the teacher was trained with '{meta.method}', not simclr: DeACL distils a standard "
                              "(non-robust) SimCLR encoder")
        if meta.dataset.lower() != str(settings.dataset).lower():
            self.notes.append(f"the teacher was trained on '{meta.dataset}', not '{settings.dataset}'")
        full = ckpt.build()
        self.bn = full.default_bn
        # the teacher's backbone with its first BN set and normalisation, no heads; frozen
        self.teacher = self.place(backbone_with_bn_set(full, self.bn)).eval().requires_grad_(False)
        self.teacher_sha256 = ckpt.sha256

    def model_config(self, arch: str) -> dict:
        """The teacher's whole model config (BN set, normalisation, stem padding ...) without heads."""
        c = self.teacher.config
        return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "arch"}

    def init_model(self, model) -> None:
        """The student starts as the teacher's backbone."""
        unwrap(model).backbone.load_state_dict(self.teacher.backbone.state_dict(), strict=True)

    def schedule(self):
        s = self.settings
        warmup = 10 if s.warmup_epochs is None else s.warmup_epochs
        return LinearWarmupCosine(base_lr=s.lr, epochs=s.epochs, warmup_epochs=min(warmup, s.epochs),
                                  warmup_from=s.warmup_from, min_lr=s.lr * s.min_lr_ratio)

    def views(self, batch: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The weak view ``x`` (crop with 4-pixel padding + flip) and the attack's U(-1, 1) start."""
        x = crop_flip_view(to_float(batch), gen)
        return x, uniform_noise(x, gen)

    def step(self, model, batch: Tensor, indices: Tensor, gen: torch.Generator, ctx: DistContext = DistContext()):
        """The loss of one global batch: every rank draws the views and starts of all of it and
        keeps its own slice."""
        x, noise = self.views(batch, gen)
        return self.loss(model, local_slice(x, ctx), local_slice(noise, ctx))

    def loss(self, model, x: Tensor, noise: Tensor):
        """The step's loss given its view ``x`` and the attack's start ``noise`` in [-1, 1]."""
        net = unwrap(model)
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher.features(x, self.bn)
        x_adv = attack(net, x, target, noise, self.settings, self.bn)
        s_clean, s_adv = net.features(torch.cat([x, x_adv]), self.bn).chunk(2)
        return deacl_loss(s_clean, s_adv, target, self.settings.adv_weight)

    def state(self) -> dict[str, Tensor]:
        return {"teacher_sha256": torch.tensor(list(bytes.fromhex(self.teacher_sha256)), dtype=torch.uint8)}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        stored = tensors.get("teacher_sha256")
        if stored is not None and bytes(stored.tolist()).hex() != self.teacher_sha256:
            raise UsageError("the --teacher file is not the one this run started from",
                             "resume with the same teacher, or start over with --force")
