"""An independent reference of one DeACL training step, laid out like the authors' code.

Written from the facts of pantheon5100/DeACL (``solo/methods/mocov2_distillation_AT.py``:
``training_step`` and ``generate_training_AE``; ``solo/methods/base_for_adversarial_training.py``;
the weak view of ``solo/utils/pretrain_dataloader_AdvTraining.py``), in its order of operations,
and sharing nothing with advcl_cli but the network: ``student`` and ``teacher`` are callables
from [0, 1] images to backbone features (``AdvclNet.features``), ``student_net`` the module whose
train/eval mode the step switches. Random draws are injected: the crop offsets and flips of the
weak view, and the attack's start ``delta`` ~ U(-eps, eps).
"""

from __future__ import annotations

import torch


def weak_view(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip, image by image: pad with zeros, cut the
    window whose top-left corner is ``offsets[:, i]`` (row, column) in the padded image, mirror
    it left-right where ``flips[i]``."""
    n, c, h, w = images.shape
    out = []
    for i in range(n):
        canvas = images.new_zeros((c, h + 2 * padding, w + 2 * padding))
        canvas[:, padding:padding + h, padding:padding + w] = images[i]
        top, left = int(offsets[0, i]), int(offsets[1, i])
        window = canvas[:, top:top + h, left:left + w]
        out.append(torch.flip(window, dims=[2]) if bool(flips[i]) else window)
    return torch.stack(out)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, from its definition."""
    return (a * b).sum(dim=1) / (a.pow(2).sum(dim=1).sqrt() * b.pow(2).sum(dim=1).sqrt())


class DeACLReference:
    def __init__(self, student_net, student, teacher_net, teacher, *, eps=8 / 255, steps=5, step_size=2 / 255, k=2.0):
        self.student_net, self.student = student_net, student
        self.teacher_net, self.teacher = teacher_net, teacher
        self.eps, self.steps, self.step_size, self.k = eps, steps, step_size, k

    def adversarial(self, image: torch.Tensor, target: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """PGD on -sum cos(student(x), target), the student in eval mode, from image + delta."""
        x = image.clone().detach() + delta
        self.student_net.eval()
        for _ in range(self.steps):
            x.requires_grad_()
            with torch.enable_grad():
                objective = -cos(self.student(x), target).sum()
            g = torch.autograd.grad(objective, x)[0]
            x = x.detach() + self.step_size * torch.sign(g.detach())
            x = torch.min(torch.max(x, image - self.eps), image + self.eps)
            x = torch.clamp(x, 0, 1)
        self.student_net.train()
        return x

    def training_step(self, image: torch.Tensor, delta: torch.Tensor):
        """(loss, x_adv, cos to the teacher, cos of adversarial to clean) of one batch."""
        self.teacher_net.eval()
        target = self.teacher(image)  # not detached, as in the code (the teacher is not optimised)
        x_adv = self.adversarial(image, target, delta)
        both = self.student(torch.cat([image, x_adv]))
        n = image.shape[0]
        clean, adv = both[:n], both[n:]
        c_teacher = cos(clean, target).mean()
        c_adv = cos(adv, clean).mean()
        loss = -c_teacher
        loss = loss + -self.k * c_adv
        return loss, x_adv, c_teacher.detach(), c_adv.detach()
