"""White-box L-inf and L2 attacks as pure tensor code on [0, 1] images.

Every function takes a model that maps [0, 1] images to logits, clean images ``x`` (B, C, H, W)
in [0, 1], labels ``y``, a budget ``eps`` and a ``norm`` ("linf", the default, or "l2"), and
returns adversarial images that lie in the eps-ball of that norm around ``x`` and in [0, 1].
Under L2 a step moves ``step_size`` along the per-image L2-normalised gradient (instead of its
sign), the projection rescales a perturbation longer than ``eps`` onto the sphere, and the
random start is a uniformly random direction at a radius drawn uniformly from [0, eps]. Gradients are taken with respect to the input only
(``torch.autograd.grad``), so no parameter gradients are computed or left behind. The caller
puts the model in eval mode (``engine.evaluate`` does); these functions do not change its mode.

``pgd_ascent`` is the one PGD loop of advcl (these attacks and every pretraining method's
attack, over any number of inputs at once) and ``uniform_noise`` its one random start.

Facts matched from the AdvCL evaluation code (``AttackPGD`` in ``finetuning_advCL_SLF.py``):
PGD starts from ``x + U(-eps, eps)`` (not clamped at the start), ascends the summed
cross-entropy with signed steps, and after every step projects onto the eps-ball and clamps to
[0, 1]. PGD-20 in the papers is 20 steps of 2/255 at eps 8/255. TRADES' inner maximisation
(``trades_loss`` in the RobustSSL finetuning code) starts from ``x + 0.001 * N(0, 1)`` and
ascends ``KLDivLoss(reduction='sum')(log_softmax(f(x_adv)), softmax(f(x)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import upcast

CW_KAPPA = 50.0  # the confidence of the CW-inf margin loss used in robustness evaluations
NORMS = ("linf", "l2")


def _l2(t: Tensor) -> Tensor:
    """Per-image L2 norms, shaped to broadcast against ``t`` (B, 1, 1, 1)."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Onto the ``norm`` ball of radius eps around x, then into [0, 1] (clamping only shortens an
    L2 perturbation, so the result stays in the ball)."""
    if norm == "l2":
        delta = x_adv - x
        scale = (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta * scale).clamp(0.0, 1.0)
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of unit ``norm`` for a gradient: its sign (L-inf) or the
    gradient over its L2 norm (a zero gradient stays zero)."""
    if norm == "l2":
        return grad / _l2(grad).clamp_min(1e-12)
    return grad.sign()


def uniform_noise(like: Tensor, gen: torch.Generator | None, *, count: int | None = None, norm: str = "linf") -> Tensor:
    """The one random start of every PGD in advcl, as a point of the unit ``norm`` ball per image
    (the start is ``x + eps * noise``): L-inf ``U(-1, 1)``; L2 a uniformly random direction at a
    radius drawn uniformly from [0, 1]. Shaped like ``like`` ((B, C, H, W)), or ``(count, *like.shape)``
    for ``count`` inputs drawn at once (the views of one image); drawn in float32 whatever
    ``like``'s dtype (the random stream does not depend on the precision), then cast to it."""
    shape = like.shape if count is None else (count, *like.shape)
    if norm == "l2":
        images = (-1, *like.shape[1:])  # per-image norms of (count, B, ...) too
        noise = torch.randn(shape, generator=gen, device=like.device).reshape(images)
        radius = torch.rand((noise.shape[0],) + (1,) * (noise.dim() - 1), generator=gen, device=like.device)
        return (noise / _l2(noise).clamp_min(1e-12) * radius).reshape(shape).to(like.dtype)
    return (torch.rand(shape, generator=gen, device=like.device) * 2 - 1).to(like.dtype)


def pgd_ascent(objective, starts: tuple[Tensor, ...], origins: tuple[Tensor, ...], eps: float, steps: int,
               step_size: float, norm: str = "linf") -> tuple[Tensor, ...]:
    """The one PGD loop: ``steps`` steepest-ascent steps of ``objective(*inputs)`` (a scalar) over
    any number of inputs at once, from ``starts``, each step moving every input ``step_size``
    along the sign of its gradient (L-inf) or its per-image L2-normalised gradient (L2), then
    projecting it onto the ``norm`` eps-ball around its origin and into [0, 1]. The starts are
    taken as given (not projected). Gradients are taken with respect to the inputs only
    (``torch.autograd.grad``), so no parameter gradient is left behind and no graph outlives a
    step. Returns the detached adversarial inputs, in the order of ``starts``."""
    advs = tuple(starts)
    for _ in range(steps):
        advs = tuple(a.detach().requires_grad_(True) for a in advs)
        with torch.enable_grad():
            grads = torch.autograd.grad(objective(*advs), advs)
        advs = tuple(project(a.detach() + step_size * _direction(g, norm), o, eps, norm)
                     for a, g, o in zip(advs, grads, origins))
    return tuple(a.detach() for a in advs)


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy summed over the batch (the sign of its gradient is the per-sample one)."""
    return F.cross_entropy(upcast(logits), y, reduction="sum")


def cw_loss(logits: Tensor, y: Tensor, kappa: float = CW_KAPPA) -> Tensor:
    """The CW margin loss summed over the batch: ``-clamp(z_y - max_{j != y} z_j + kappa, min=0)``.

    Ascending it lowers the true-class margin until another class wins by ``kappa``."""
    return -(margin(logits, y) + kappa).clamp(min=0).sum()


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per image, the true class's logit minus the largest other one (positive: classified right)."""
    logits = upcast(logits)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return true - others


def iterative_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    *,
    loss_fn=ce_loss,
    random_start: bool = True,
    gen: torch.Generator | None = None,
    start: Tensor | None = None,
    norm: str = "linf",
) -> Tensor:
    """Steepest ascent of ``loss_fn(model(x_adv), y)`` inside the ``norm`` eps-ball (PGD).

    ``y`` is whatever ``loss_fn`` compares with (labels, or TRADES' clean softmax). The ascent
    starts at ``start`` when given, else at a uniform random point of the ball (L-inf:
    ``x + U(-eps, eps)``) or (``random_start=False``) ``x``."""
    x, y = x.detach(), y.detach()
    if start is None:
        start = x + eps * uniform_noise(x, gen, norm=norm) if random_start else x
    (x_adv,) = pgd_ascent(lambda a: loss_fn(model(a), y), (start,), (x,), eps, steps, step_size, norm)
    return project(x_adv, x, eps, norm)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 1, step_size: float | None = None,
         gen: torch.Generator | None = None, norm: str = "linf") -> Tensor:
    """One step of size eps from the clean image, signed (L-inf) or L2-normalised (the fast
    gradient method); ``steps``/``gen`` are ignored."""
    return iterative_attack(model, x, y, eps, 1, eps, random_start=False, norm=norm)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
        gen: torch.Generator | None = None, norm: str = "linf") -> Tensor:
    """PGD-k on the cross-entropy with a uniform random start; step ``eps/4`` (2/255 at 8/255)."""
    step_size = eps / 4 if step_size is None else step_size
    return iterative_attack(model, x, y, eps, steps, step_size, loss_fn=ce_loss, gen=gen, norm=norm)


def cw(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
       gen: torch.Generator | None = None, norm: str = "linf") -> Tensor:
    """CW: PGD-k on the CW margin loss (kappa 50) with a uniform random start."""
    step_size = eps / 4 if step_size is None else step_size
    return iterative_attack(model, x, y, eps, steps, step_size, loss_fn=cw_loss, gen=gen, norm=norm)


def trades_kl(logits_adv: Tensor, p_nat: Tensor) -> Tensor:
    """``KLDivLoss(reduction='sum')(log_softmax(logits_adv), p_nat)``: sum over the batch."""
    return F.kl_div(F.log_softmax(upcast(logits_adv), dim=1), p_nat, reduction="sum")


def trades_adversary(model: nn.Module, x: Tensor, eps: float, steps: int = 10, step_size: float = 2 / 255,
                     gen: torch.Generator | None = None, natural: nn.Module | None = None,
                     random_start: bool = True, norm: str = "linf") -> Tensor:
    """TRADES' inner maximisation: start at ``x + 0.001 N(0, 1)`` (at ``x`` itself without
    ``random_start``, as DynACL++'s code does) and ascend the summed KL between the softmax on
    ``x`` (computed once, by ``natural`` when given: the clean route of a dual-BN model) and the
    model's softmax on ``x_adv``."""
    x = x.detach()
    with torch.no_grad():
        p_nat = F.softmax(upcast((natural or model)(x)), dim=1)
    if random_start:
        start = x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    else:
        start = x.clone()
    return iterative_attack(model, x, p_nat, eps, steps, step_size, loss_fn=trades_kl, start=start, norm=norm)


def trades_objective(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float = 6.0) -> Tensor:
    """``CE(logits_nat, y) + beta * KL_sum(softmax(logits_adv) || softmax(logits_nat)) / B``
    (batch-mean cross-entropy; the gradient flows through the clean softmax too, as in the
    reference's ``criterion_kl(log_softmax(adv), softmax(nat))``)."""
    logits_nat = upcast(logits_nat)
    p_nat = F.softmax(logits_nat, dim=1)
    return F.cross_entropy(logits_nat, y) + beta * trades_kl(logits_adv, p_nat) / logits_nat.shape[0]


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, beta: float = 6.0) -> Tensor:
    """The TRADES objective with two forward passes, clean then adversarial, in the model's
    current mode (train mode during AFF), as in the reference."""
    return trades_objective(model(x), model(x_adv), y, beta)
