"""Sanity flags of a robust evaluation, after AutoAttack's flags document (fra31/auto-attack,
``flags_doc.md``): signs that a number is not what it seems, each said in one line with what it
suggests. ``engine.evaluate.evaluate`` checks them on every robust evaluation and returns them
as ``flags``:

- ``train-mode``: modules still in train mode while evaluating (BN and dropout then change the
  predictions): a bug;
- ``randomness``: two forward passes of the same images disagree: a randomised model, for which
  ``autoattack-rand`` (EOT) is the fitting attack;
- ``gradients``: the input gradient of the logit margin is zero or not finite for more than
  ``ZERO_GRADIENTS`` of the images checked: gradient masking (a non-differentiable step, a
  saturated output), which gradient attacks cannot see through;
- ``robust-above-clean``: the adversarial images alone are classified better than the clean ones
  (robust accuracy itself cannot exceed clean, as an image counts only if both are right): a
  randomised model or a bug in the attack;
- ``eps-not-falling``: over an eps sweep, an attack's robust accuracy rises with eps by more than
  ``EPS_RISE``: gradient masking or a weak attack;
- ``pgd-check`` (opt-in, ``pgd_check`` images): PGD-20's robust accuracy exceeds PGD-100 with 5
  restarts' by more than ``PGD_MARGIN``: PGD-20 is too weak here (gradient masking or a hard
  landscape); trust the stronger number or AutoAttack.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attacks import get_attack
from ..attacks.pgd import margin
from ..settings import format_eps

ZERO_GRADIENTS = 0.1  # the share of images with a zero or non-finite gradient that is flagged
EPS_RISE = 0.01  # robust accuracy rising by more than this from one eps to a larger one
PGD_MARGIN = 0.05  # PGD-20 above PGD-100 x 5 restarts by more than this
CHECK_STEPS, CHECK_RESTARTS = 100, 5
MODEL_CHECK_IMAGES = 128  # images of the first block the model checks look at


def flag(check: str, message: str, suggests: str, **where) -> dict:
    """One flag: the check's name, what was seen, what it suggests, and where (attack, eps)."""
    return {"check": check, **where, "message": message, "suggests": suggests}


def describe(f: dict) -> str:
    """A flag in one line."""
    return f"flag {f['check']}: {f['message']} (suggests {f['suggests']})"


def model_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """The checks of the model itself on a few clean images: train mode, randomness between two
    identical forwards, zero or non-finite input gradients (of the logit margin, which does not
    saturate as the cross-entropy does on confident images)."""
    x, y = x[:MODEL_CHECK_IMAGES].detach(), y[:MODEL_CHECK_IMAGES]
    flags = []
    training = [name or type(m).__name__ for name, m in model.named_modules() if m.training]
    if training:
        flags.append(flag("train-mode", f"{len(training)} module(s) are in train mode during evaluation "
                                        f"({', '.join(training[:3])}{', ...' if len(training) > 3 else ''})",
                          "a bug: batch norm and dropout then change the predictions; evaluate in eval mode"))
    with torch.no_grad():
        first, second = model(x), model(x)
    if not torch.allclose(first, second, rtol=1e-3, atol=1e-4, equal_nan=True):
        flags.append(flag("randomness", "two forward passes of the same images gave different logits",
                          "a randomised model: evaluate it with autoattack-rand (EOT), not a single draw"))
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = margin(model(x), y).sum()
    (grad,) = torch.autograd.grad(loss, [x])
    grad = grad.flatten(1)
    bad = ~torch.isfinite(grad).all(1) | (grad.abs().amax(1) == 0)
    share = bad.float().mean().item() if len(bad) else 0.0
    if share > ZERO_GRADIENTS:
        flags.append(flag("gradients", f"the input gradient is zero or not finite for {int(bad.sum())} of {len(bad)} "
                                       "images checked", "gradient masking (a non-differentiable or saturated step): "
                                                         "gradient attacks overestimate robustness; use square or autoattack"))
    return flags


def result_flags(clean_acc: float, rows: list[dict]) -> list[dict]:
    """The checks of the numbers: adversarial accuracy above clean, and robust accuracy rising
    with eps over a sweep (``rows``: ``evaluate``'s robust rows)."""
    flags = []
    for r in rows:
        if r["adv_acc"] > clean_acc:
            flags.append(flag("robust-above-clean", f"{r['attack']} at eps {r['eps_label']}: the adversarial images are "
                                                    f"classified better ({r['adv_acc']:.2%}) than the clean ones "
                                                    f"({clean_acc:.2%})", "a randomised model or a bug in the attack",
                              attack=r["attack"], eps=r["eps"]))
    for attack in dict.fromkeys(r["attack"] for r in rows):
        sweep = sorted((r["eps"], r["robust_acc"]) for r in rows if r["attack"] == attack)
        for (small, low), (large, high) in zip(sweep, sweep[1:]):
            if high > low + EPS_RISE:
                flags.append(flag("eps-not-falling", f"{attack}: robust accuracy rises from {low:.2%} at eps "
                                                     f"{format_eps(small)} to {high:.2%} at {format_eps(large)}",
                                  "gradient masking or a weak attack (a larger budget can only help the attacker)",
                                  attack=attack, eps=large))
    return flags


def check_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list, norm: str, seed: int) -> tuple[list, list]:
    """PGD-20 and PGD-100 with 5 restarts on the float images ``x`` at every eps: rows
    ``{"eps", "eps_label", "n", "pgd20_acc", "pgd100x5_acc"}`` and the flags where PGD-20 is
    above by more than ``PGD_MARGIN``. An image is robust only if its clean prediction is right
    and (PGD-100) every restart failed."""
    weak, strong = get_attack("pgd20", norm), get_attack(f"pgd{CHECK_STEPS}", norm)
    gen = torch.Generator(device=x.device)
    with torch.no_grad():
        right = model(x).argmax(1) == y
    rows, flags = [], []
    for eps in eps_list:
        gen.manual_seed(seed)
        with torch.no_grad():
            weak_ok = right & (model(weak(model, x, y, eps, gen=gen)).argmax(1) == y)
        strong_ok = right.clone()
        for _ in range(CHECK_RESTARTS):
            with torch.no_grad():
                strong_ok &= model(strong(model, x, y, eps, gen=gen)).argmax(1) == y
        n = max(len(y), 1)
        row = {"eps": eps, "eps_label": format_eps(eps), "n": len(y), "pgd20_acc": weak_ok.sum().item() / n,
               f"pgd{CHECK_STEPS}x{CHECK_RESTARTS}_acc": strong_ok.sum().item() / n}
        rows.append(row)
        gap = row["pgd20_acc"] - row[f"pgd{CHECK_STEPS}x{CHECK_RESTARTS}_acc"]
        if gap > PGD_MARGIN:
            flags.append(flag("pgd-check", f"at eps {row['eps_label']} on {len(y)} images PGD-20 leaves "
                                           f"{row['pgd20_acc']:.2%} robust, PGD-{CHECK_STEPS} x {CHECK_RESTARTS} restarts "
                                           f"{row[f'pgd{CHECK_STEPS}x{CHECK_RESTARTS}_acc']:.2%}",
                              "PGD-20 is too weak here (gradient masking or a hard landscape): trust the stronger "
                              "attack or AutoAttack", attack="pgd20", eps=eps))
    return rows, flags
