"""AutoLoRa (Xu et al., ICLR 2024), the finetuning scheme ``--scheme autolora``.

Matched to the RobustSSL benchmark's ``Finetuning_Methods/AutoLoRa`` (``AutoLoRa.py
--autolora``, ``utils.py``: ``trades_loss_autolora``, ``train_loop``, ``train``;
``models/LoRA.py``, ``models/resnet_lora.py``), the adversarial full finetuning with a
low-rank branch that its ``run_autolora.sh`` runs (``--dualBN 0``: one BN set, the encoder's
"pgd"):

- the LoRA branch: every convolution of the backbone's blocks (not the stem, not the head)
  gets rank-8 factors ``A`` (8k x k in, N(0, 1)) and ``B`` (k out x 8k, zero), and on the
  natural route computes with ``W + (B @ A).view(W.shape) / 8`` (lora_alpha 1 over rank 8);
  the adversarial route uses ``W`` alone. The kept classifier is the backbone without it;
- the attack: 10 signed steps of 2/255 from ``x + 0.001 N(0, 1)`` ascending the cross-entropy
  of the model without the branch, in eval mode, projected onto the eps-ball and [0, 1];
- the loss, in train mode (the BN statistics follow both forward passes):
  ``l1 CE(f_lora(x), y) + (1 - l1) CE(f(x_adv), y) + l2 KL_sum(f(x_adv) || f_lora(x)) / B``,
  where the natural forward pass trains only the branch and the classifier head (the
  backbone's weights are constants in it) and the adversarial one everything but the branch;
- the automatic loss weights ``l1 = 1 - a``, ``l2 = 6 a`` (``--trades-beta``, the code's
  ``--scale``), ``a`` the clean accuracy on the whole augmented training split in eval mode,
  measured before every epoch and after the steps at batch index 0, q, 2q, 3q, ...
  (q = int(steps / 4), at least 1). With one BN set the code's measurement runs the model
  without the branch (its ``eval_test_nat`` drops the ``thread`` argument), reproduced;
- the automatic learning rate (``AutoLR``): 0.1 at the start (``--lr``); after every epoch the PGD-20
  accuracy on a validation split (the code's: the whole training split without augmentation;
  here the held-out split when ``--val-fraction`` is given), the best state kept; at the
  epochs 1 + W_j for the checkpoints W = 0, 16, 24, 28, 36, 40, 42, 44, 46, 48, 50 the rate is
  halved, and the best state reloaded, when the accuracy rose in fewer than 0.75 of the
  window's epochs, or when neither the rate nor the best accuracy moved in the window;
- SGD, momentum 0.9, weight decay 2e-4 on every parameter (the branch's too), batch 128,
  50 epochs.

Not copied: the code keeps the epoch with the best PGD-20 accuracy on the test set; advcl keeps
the last epoch (or the best on ``--val-fraction``'s held-out split), as for every scheme.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..attacks.pgd import ce_loss, iterative_attack, trades_kl
from ..checkpoint import clean_state_dict, unwrap
from ..data.augment import crop_flip_view
from ..device import autocast, upcast

RANK = 8
LORA_ALPHA = 1
WINDOWS = (0, 16, 24, 28, 36, 40, 42, 44, 46, 48, 50)  # the code's W for AFF
RHO = 0.75
DIVIDE = 2
START_LR = 0.1  # the code's eta, whatever --lr says; advcl starts at --lr (the protocol's 0.1)


class LoRA(nn.Module):
    """Rank-``rank`` factors for every convolution in ``backbone.layers`` (named as in the
    backbone), and the merged weights of the natural route."""

    def __init__(self, backbone: nn.Module, rank: int = RANK):
        super().__init__()
        self.rank = rank
        self.convs = [name for name, m in backbone.layers.named_modules() if isinstance(m, nn.Conv2d)]
        self.a, self.b = nn.ParameterList(), nn.ParameterList()
        for name in self.convs:
            out, cin, k, _ = backbone.layers.get_submodule(name).weight.shape
            self.a.append(nn.Parameter(torch.randn(rank * k, cin * k)))
            self.b.append(nn.Parameter(torch.zeros(out * k, rank * k)))

    def natural_weights(self, net) -> dict[str, Tensor]:
        """The backbone's parameters for the natural route: every one a constant (detached),
        each block convolution's weight plus its low-rank update (which trains)."""
        weights = {f"backbone.{k}": v.detach() for k, v in net.backbone.named_parameters()}
        for name, a, b in zip(self.convs, self.a, self.b):
            key = f"backbone.layers.{name}.weight"
            w = weights[key]
            weights[key] = w + (b @ a).view(w.shape) * (LORA_ALPHA / self.rank)
        return weights


def natural_logits(model, x: Tensor) -> Tensor:
    """The classifier's logits through the LoRA branch (``model.lora``), its backbone constant."""
    net = unwrap(model)
    return functional_call(net, net.lora.natural_weights(net), (x,))


def autolora_loss(model, x: Tensor, y: Tensor, x_adv: Tensor, l1: float, l2: float) -> tuple[Tensor, Tensor]:
    """(loss, natural logits) of one batch with the adversarial images given, in the model's
    current mode (train mode in finetuning)."""
    nat = upcast(natural_logits(model, x))
    adv = upcast(model(x_adv))
    loss = l1 * F.cross_entropy(nat, y) + (1 - l1) * F.cross_entropy(adv, y) + l2 * trades_kl(adv, F.softmax(nat, 1)) / len(x)
    return loss, nat


def adversary(model, x: Tensor, y: Tensor, s, gen: torch.Generator) -> Tensor:
    """PGD on the cross-entropy of the model without the branch, from x + 0.001 N(0, 1), eval mode."""
    model.eval()
    start = x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return iterative_attack(model, x, y, s.eps, s.attack_steps, s.attack_step_size, loss_fn=ce_loss, start=start,
                            norm=s.norm)


@torch.no_grad()
def natural_accuracy(model, images: Tensor, labels: Tensor, batch_size: int, gen: torch.Generator, precision, device) -> float:
    """Clean accuracy (eval mode, without the branch) on crop+flip views of ``images`` (uint8)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)  # counted on the device, read once
    for start in range(0, len(images), batch_size):
        x = crop_flip_view(images[start:start + batch_size], gen)
        with autocast(precision, device):
            correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum()
    return int(correct) / max(len(images), 1)


class AutoLR:
    """The code's automatic learning rate (``train`` with ``--autoLR 1``), one ``update`` per
    epoch; also the ``Loop``'s schedule (``lr`` gives the current rate)."""

    def __init__(self, epochs: int, start: float = START_LR):
        self.eta, self.w = start, 1
        self.etas = [start] + [0.0] * (len(WINDOWS) - 1)
        self.best_in = [0.0] * len(WINDOWS)
        self.accs = [0.0] * (epochs + 1)
        self.best = -1.0

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        return self.eta

    def update(self, epoch: int, acc: float) -> tuple[bool, bool]:
        """After 1-based ``epoch`` with validation accuracy ``acc``: (a new best, reload the
        best state)."""
        self.accs[epoch - 1] = acc
        improved = acc > self.best
        if improved:
            self.best_in[self.w] = acc
            self.best = acc
        reload = False
        if epoch - 1 == WINDOWS[self.w]:
            w0, w1 = WINDOWS[self.w - 1], WINDOWS[self.w]
            rises = sum(self.accs[j + 1] > self.accs[j] for j in range(w0, w1))
            if rises < RHO * (w1 - w0) or (self.etas[self.w] == self.etas[self.w - 1]
                                          and self.best_in[self.w] == self.best_in[self.w - 1]):
                self.eta /= DIVIDE
                self.etas[self.w] = self.eta
                reload = True
            if self.w < len(WINDOWS) - 1:
                self.w += 1
                self.best_in[self.w] = self.best_in[self.w - 1]
                self.etas[self.w] = self.etas[self.w - 1]
        return improved, reload

    def state(self) -> dict:
        return {"eta": self.eta, "w": self.w, "etas": self.etas, "best_in": self.best_in, "accs": self.accs,
                "best": self.best}

    def load_state(self, state: dict) -> None:
        self.eta, self.w, self.best = state["eta"], state["w"], state["best"]
        self.etas, self.best_in, self.accs = list(state["etas"]), list(state["best_in"]), list(state["accs"])


class AutoLoRaRun:
    """What one AutoLoRa finetuning keeps between steps: the loss weights, where in the epoch
    they are measured again, the learning rate and the best state so far."""

    def __init__(self, settings, images: Tensor, labels: Tensor, steps: int):
        self.s, self.images, self.labels = settings, images, labels
        self.every = max(int(steps / 4), 1)
        self.schedule = AutoLR(settings.epochs, settings.lr)
        self.l1, self.l2 = 0.0, 0.0
        self.epoch, self.step_index = 0, 0
        self.best_state: dict[str, Tensor] | None = None

    def measure(self, model, precision, device) -> None:
        gen = torch.Generator(device=self.images.device).manual_seed(self.s.seed * 1_000_003 + 7919 * self.epoch + self.step_index)
        a = natural_accuracy(model, self.images, self.labels, self.s.batch_size, gen, precision, device)
        self.l1, self.l2 = 1 - a, a * self.s.trades_beta
        model.train()

    def start_epoch(self, epoch: int, model, precision, device) -> None:
        self.epoch, self.step_index = epoch, 0
        self.measure(model, precision, device)

    def after_step(self, model, precision, device) -> None:
        if self.step_index % self.every == 0:
            self.measure(model, precision, device)
        self.step_index += 1

    def end_epoch(self, model, done: int, acc: float) -> None:
        """The rate after epoch ``done`` (1-based) from the validation PGD-20 accuracy ``acc``."""
        improved, reload = self.schedule.update(done, acc)
        net = unwrap(model)
        if improved:
            self.best_state = copy.deepcopy(clean_state_dict(net.state_dict()))
        if reload and self.best_state is not None:
            net.load_state_dict(self.best_state)

    def state(self) -> dict:
        return {"schedule": self.schedule.state(), **({"best": self.best_state} if self.best_state is not None else {})}

    def load_state(self, state: dict) -> None:
        if "schedule" in state:
            self.schedule.load_state(state["schedule"])
        self.best_state = state.get("best")
