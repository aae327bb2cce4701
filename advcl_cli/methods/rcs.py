"""RCS, robustness-aware coreset selection (Xu et al., NeurIPS 2023), for the ACL family.

``--coreset FRACTION`` trains ACL, DynACL or AIR on a coreset after a full-data warm-up. Matched to
the authors' ``ACL_RCS/small_scale_datasets`` (``RCS.py``, ``ACL_RCS.py``, ``DynACL_RCS.py``,
GodXuxilie/Efficient_ACL_via_RCS):

- 1 % of the training images are held out for the whole run (a seeded permutation; the first
  ``int(0.99 N)`` train), the validation split the selection measures robustness on;
- the first selection runs before 1-based epoch ``e >= --coreset-warmup`` with
  ``(e - 1) % --coreset-every == 0`` (authors: ``--warmup 100 --fre 20``: epochs 101, 121, ...);
  the epochs before it train on every (non-held-out) image, the others on the last selection;
- a selection, with the model in eval mode everywhere (the backbone never changes):
  the training images are shuffled into candidate batches of ``--batch-size`` (the last one
  smaller). For each, the method's two views, ACL's contrastive attack (both views from
  x + U(-eps, eps), ``--pgd-steps`` of ``--pgd-step-size`` on the NT-Xent through "pgd"), the
  backbone features (clean through "normal", attacked through "pgd"), and the gradient of
  ``(NT-Xent(clean) + NT-Xent(attacked)) / 2`` with respect to the projection head's linear
  layers (fc1.weight, fc1.bias, fc2.weight, fc3.weight). A batch is summarised by the mean over
  the output axis of each of those gradients, concatenated (512 + 1 + 512 + 512 numbers);
- the validation gradient, the same summary of the gradient of the robustness divergence
  ``KLDivLoss(mean)(log(mm(z_clean) + 1e-8), mm(z_adv) + 1e-8)`` (``mm``: each row min-max
  scaled to [0, 1]; z the projections, clean through "normal", adversarial through "pgd"),
  with the adversarial validation images from 3 PGD steps of (10/255)/3 ascending that
  divergence from x + U(-eps, eps);
- the greedy: ``int(int(N_train * FRACTION) / batch_size)`` rounds; each takes the remaining
  batch whose summary has the largest dot product with the validation gradient, then (but for
  the last round) moves the head's linear layers by ``-2 x 0.01`` times that batch's full
  gradients (the code applies its ``Coreset_lr`` step to ``linear_layer`` and to
  ``model.fc``, one module, so twice) and recomputes the validation gradient (new attack, new
  random start). The head is restored afterwards. The coreset is the chosen batches' images.

Reproduced as coded, on purpose: the validation loader's batches are the two views of each
image interleaved and cut to the batch's length, so a batch of b images uses its first b/2
images twice each (with different random starts); the doubled head step. The CIFAR scripts
name a selection batch size (``Coreset_bs``) they never define; their ImageNet version and the
greedy's budget use the training batch size, as here. The epochs between the warm-up and a first
selection that the schedule puts later (a warm-up the period does not divide) train on every
image here; the authors' code takes a random subset there.

Selection runs on rank 0 under torchrun and is broadcast; the chosen indices are part of the
resume state (``Coreset.state``), so a resumed run trains on the same images.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import Tensor

from ..attacks.pgd import pgd_ascent, uniform_noise
from ..checkpoint import unwrap
from ..distributed import DistContext, broadcast_from_main, on_main
from ..errors import UsageError
from ..settings import option
from .losses import nt_xent

TRAIN_SHARE = 0.99  # the authors' int(0.99 N) training images; the rest is the validation split
SELECT_LR = 0.01  # their --Coreset_lr
VAL_PGD_STEPS = 3  # their --Coreset_pgd_iter
VAL_PGD_STEP_SIZE = (10 / 255) / VAL_PGD_STEPS
STREAM = 1 << 40  # the selection's random stream, apart from the epochs' (seed * 1_000_003 + epoch)


class CoresetSettings(BaseModel):
    """RCS's options (``--coreset`` off by default)."""

    coreset: float | None = option(
        None, "RCS: after the warm-up, train on a robustness-aware coreset of this fraction of the training images "
              "(the authors: 0.05 to 0.2), re-selected every --coreset-every epochs; 1 % is held out to select on.",
        gt=0, lt=1, metavar="FRACTION")
    coreset_warmup: int = option(100, "RCS: the first selection is at the first epoch >= this one (1-based) that "
                                      "the period allows; the epochs before train on every image.", ge=1)
    coreset_every: int = option(20, "RCS: epochs between selections.", ge=1)


def minmax(z: Tensor) -> Tensor:
    """Each row scaled to [0, 1]: (z - min) / (max - min) (the authors' ``normalize``)."""
    z = z - z.min(1, keepdim=True).values
    return z / z.max(1, keepdim=True).values


def divergence(z_adv: Tensor, z_clean: Tensor) -> Tensor:
    """RCS's robustness divergence, the authors' ``kl_loss``:
    ``KLDivLoss(reduction="mean")(log(minmax(z_clean) + 1e-8), minmax(z_adv) + 1e-8)``."""
    q = minmax(z_adv) + 1e-8
    return (q * (q.log() - (minmax(z_clean) + 1e-8).log())).mean()


def head_weights(net) -> list[Tensor]:
    """The projection head's linear layers (fc1.weight, fc1.bias, fc2.weight, fc3.weight)."""
    return [p for name, p in net.proj.named_parameters() if name.startswith("fc")]


def summary(grads: list[Tensor]) -> Tensor:
    """The authors' gradient summary: each gradient's mean over its first axis, concatenated."""
    return torch.cat([g.mean(0).reshape(-1) for g in grads])


def validation_attack(net, x: Tensor, noise: Tensor, eps: float) -> Tensor:
    """3 signed steps of (10/255)/3 from ``x + eps * noise`` ascending ``divergence`` of the
    projection through "pgd" from the clean one through "normal" (eval mode)."""
    with torch.no_grad():
        z_clean = net.project(net.features(x, "normal"), "normal")
    (a,) = pgd_ascent(lambda a: divergence(net.project(net.features(a, "pgd"), "pgd"), z_clean), (x + eps * noise,), (x,),
                      eps, VAL_PGD_STEPS, VAL_PGD_STEP_SIZE)
    return a


def validation_gradient(net, val: Tensor, batch_size: int, eps: float, gen: torch.Generator) -> Tensor:
    """The summary of the divergence's gradient over the validation images ``val`` (float,
    [0, 1]), in batches of ``batch_size`` as the authors' loader gives them (see the module's
    docstring: the first half of each batch, twice)."""
    clean, adv = [], []
    for chunk in val.split(batch_size):
        x = chunk.repeat_interleave(2, dim=0)[: len(chunk)]
        a = validation_attack(net, x, uniform_noise(x, gen), eps)
        with torch.no_grad():
            clean.append(net.features(x, "normal"))
            adv.append(net.features(a, "pgd"))
    loss = divergence(net.project(torch.cat(adv), "pgd"), net.project(torch.cat(clean), "normal"))
    return summary(torch.autograd.grad(loss, head_weights(net)))


def batch_gradient(method, net, images: Tensor, gen: torch.Generator) -> list[Tensor]:
    """The head's gradients of ACL's loss on one candidate batch (uint8 images), eval mode."""
    from .acl import contrastive_attack

    s = method.settings
    x1, x2 = method.views(images, gen, next(net.parameters()).dtype)[:2]
    a1, a2 = contrastive_attack(net, x1, x2, uniform_noise(x1, gen, count=2), eps=s.eps, steps=s.pgd_steps,
                                step_size=s.pgd_step_size, temperature=s.temperature)
    with torch.no_grad():
        clean, adv = net.features(torch.cat([x1, x2]), "normal"), net.features(torch.cat([a1, a2]), "pgd")
    b = len(x1)
    z, za = net.project(clean, "normal"), net.project(adv, "pgd")
    loss = (nt_xent(torch.stack([z[:b], z[b:]], 1), s.temperature) + nt_xent(torch.stack([za[:b], za[b:]], 1), s.temperature)) / 2
    return list(torch.autograd.grad(loss, head_weights(net)))


def select(method, net, images: Tensor, val: Tensor, *, fraction: float, batch_size: int,
           gen: torch.Generator, gains: list | None = None) -> Tensor:
    """RCS's greedy selection (see the module's docstring): positions into ``images`` (uint8,
    the training images), chosen by whole candidate batches; ``val`` the validation images
    (uint8). ``net`` is left as it was (its head restored, its mode back). Each round's gains
    (over the batches left) are appended to ``gains`` when given."""
    was_training = net.training
    net.eval()
    weights = head_weights(net)
    saved = [w.detach().clone() for w in weights]
    eps = method.settings.eps
    val = val.to(next(net.parameters()).dtype) / 255
    try:
        g_val = validation_gradient(net, val, batch_size, eps, gen)
        candidates = torch.randperm(len(images), generator=gen, device=gen.device).to(images.device).split(batch_size)
        grads = [batch_gradient(method, net, images[idx], gen) for idx in candidates]
        summaries = torch.stack([summary(g) for g in grads])
        rounds = int(int(len(images) * fraction) / batch_size)
        left, chosen = list(range(len(candidates))), []
        for j in range(rounds):
            gain = summaries[left] @ g_val
            r = int(torch.argmax(gain))
            if gains is not None:
                gains.append(gain)
            chosen.append(left[r])
            if j == rounds - 1:
                break
            with torch.no_grad():
                for w, g in zip(weights, grads[left[r]]):
                    w.sub_(2 * SELECT_LR * g)  # the code's step, applied twice to the one head
            g_val = validation_gradient(net, val, batch_size, eps, gen)
            del left[r]
    finally:
        with torch.no_grad():
            for w, v in zip(weights, saved):
                w.copy_(v)
        net.train(was_training)
    return torch.cat([candidates[c] for c in chosen]) if chosen else torch.zeros(0, dtype=torch.long)


def split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(training positions, validation positions) of ``n`` images, sorted: a seeded permutation,
    the first ``int(0.99 n)`` to train."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(n * TRAIN_SHARE)
    return perm[:n_train].sort().values, perm[n_train:].sort().values


class Coreset:
    """The coreset of one run: the split, when to select, the current selection (resume state)."""

    def __init__(self, settings, n_images: int):
        self.s = settings
        self.train, self.val = split(n_images, settings.seed)
        self.selected: Tensor | None = None  # positions into the dataset
        self.selected_at = -1  # the 0-based epoch it was selected before (a run resumed mid-epoch keeps it)
        if len(self.val) == 0:
            raise UsageError(f"--coreset needs a validation split: 1 % of {n_images} images is none",
                             "use at least 100 training images (--limit)")
        budget = int(len(self.train) * settings.coreset)
        if budget < settings.batch_size:
            raise UsageError(f"--coreset {settings.coreset} of {len(self.train)} training images is {budget} images, "
                             f"less than one batch of {settings.batch_size}",
                             "use a larger --coreset fraction or a smaller --batch-size")

    def describe(self, epochs: int) -> str:
        """One line for people: the split and when the coreset starts."""
        first = next((e for e in range(epochs) if self.selects(e)), None)
        when = f"from epoch {first + 1}, re-selected every {self.s.coreset_every}" if first is not None else "never in this run"
        return (f"RCS: {len(self.val)} images held out to select on; a coreset of {self.s.coreset:g} of "
                f"{len(self.train)} images {when}")

    def selects(self, epoch: int) -> bool:
        """Whether a selection runs before 0-based ``epoch``."""
        return epoch + 1 >= self.s.coreset_warmup and epoch % self.s.coreset_every == 0

    def start_epoch(self, epoch: int, method, model, data, batches, ctx: DistContext) -> None:
        """Before every epoch: select when due (rank 0, broadcast), and point ``batches`` at the
        images this epoch trains on."""
        if self.selects(epoch) and self.selected_at != epoch:
            self.selected, self.selected_at = self._select(epoch, method, model, data, ctx), epoch
        batches.use(self.selected if self.selected is not None else self.train)

    def _select(self, epoch: int, method, model, data, ctx: DistContext) -> Tensor:
        net, device = unwrap(model), data.images.device
        gen = torch.Generator(device=device).manual_seed(STREAM + self.s.seed * 1_000_003 + epoch)
        train = self.train.to(device)
        found = on_main(lambda: train[select(method, net, data.images[train], data.images[self.val.to(device)],
                                             fraction=self.s.coreset, batch_size=self.s.batch_size, gen=gen)], ctx)
        size = broadcast_from_main(torch.tensor([0 if found is None else len(found)], device=device), ctx)
        out = found if found is not None else torch.zeros(int(size), dtype=torch.long, device=device)
        return broadcast_from_main(out.to(device), ctx).cpu()

    def state(self) -> dict[str, Tensor]:
        return {} if self.selected is None else {"selected": self.selected.clone(), "at": self.selected_at}

    def load_state(self, state: dict) -> None:
        if "selected" in state:
            self.selected, self.selected_at = state["selected"].long(), int(state["at"])
