"""Batched robust evaluation: clean accuracy and robust accuracy per (attack, eps).

Used by ``advcl eval``, by finetuning's final metrics and by the zoo. The dataset sits on the
device as uint8; each batch is converted to [0, 1] floats there. Counts accumulate on the
device and are read once per attack (no per-batch ``.item()``), so the GPU never waits for the
host inside a loop. The model is put in eval mode for the whole evaluation.

An image counts as robust only when both its clean and its adversarial prediction are right
(the worst case over the two, as AutoAttack and RobustBench count), so robust accuracy never
exceeds clean accuracy.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from ..attacks import Attack, get_attack
from ..checkpoint import not_a_classifier, unwrap
from ..data.augment import to_float
from ..data.registry import ImageData
from ..errors import DataError
from ..settings import format_eps
from .device import autocast
from .report import Reporter


def robust_correct(clean_pred: torch.Tensor, adv_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: robust only if both its clean and its adversarial prediction are right."""
    return (clean_pred == labels) & (adv_pred == labels)


class _Logits(nn.Module):
    """The model's logits in fp32 (autocast inside when asked)."""

    def __init__(self, model: nn.Module, precision: str, device: torch.device):
        super().__init__()
        self.model, self.precision, self.device = model, precision, device

    def forward(self, x):
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            out = self.model(x)
        return out.float()


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """On the device, in eval mode; channels_last on CUDA."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predictions(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted labels for uint8 or float images, batched, no gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size]
            x = to_float(chunk) if chunk.dtype == torch.uint8 else chunk
            out.append(model(x).argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=images.device)


def evaluate(
    model: nn.Module,
    data: ImageData,
    attacks: Sequence[str | Attack] = (),
    eps_list: Sequence[float] = (8 / 255,),
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> dict:
    """Clean accuracy and, for every attack and eps, robust accuracy and seconds.

    Returns ``{"n", "clean_acc", "robust": [{"attack", "eps", "eps_label", "robust_acc",
    "seconds", "images_per_s"}], "attacks": {name: description}}``; accuracies are fractions.
    """
    reporter = reporter or Reporter()
    device = torch.device(device)
    net = unwrap(model)
    if net.fc is None:
        raise not_a_classifier("the model has no classifier head")
    if data.num_classes != net.config.num_classes:
        raise DataError(
            f"the classifier has {net.config.num_classes} classes but dataset '{data.name}' has {data.num_classes}",
            "evaluate on the dataset it was finetuned on (--dataset)",
        )
    attacks = [a if isinstance(a, Attack) else get_attack(a) for a in attacks]
    model = _prepare(model, device)
    logits = _Logits(model, precision, device)
    data = data.to(device)
    n = len(data)

    t0 = time.perf_counter()
    clean_pred = predictions(logits, data.images, batch_size)
    clean_acc = (clean_pred == data.labels).sum().item() / max(n, 1)
    reporter.log(f"clean accuracy {clean_acc:.2%} on {n} images ({time.perf_counter() - t0:.1f} s)")

    results = []
    for attack in attacks:
        for eps in eps_list:
            label = f"{attack.name} eps={format_eps(eps)}"
            gen = torch.Generator(device=device).manual_seed(seed)
            correct = torch.zeros((), dtype=torch.long, device=device)
            reporter.start(label, n, unit="img")
            _sync(device)
            start = time.perf_counter()
            for i in range(0, n, batch_size):
                x = to_float(data.images[i : i + batch_size])
                y = data.labels[i : i + batch_size]
                x_adv = attack(logits, x, y, eps, gen=gen, seed=seed, log=reporter.warn)
                with torch.no_grad():
                    adv_pred = logits(x_adv).argmax(1)
                correct += robust_correct(clean_pred[i : i + batch_size], adv_pred, y).sum()
                reporter.advance(x.shape[0])
            acc = correct.item() / max(n, 1)  # the one sync of this attack
            seconds = time.perf_counter() - start
            reporter.finish()
            reporter.log(f"{label}: robust accuracy {acc:.2%} ({seconds:.1f} s)")
            results.append(
                {
                    "attack": attack.name,
                    "eps": eps,
                    "eps_label": format_eps(eps),
                    "robust_acc": acc,
                    "seconds": seconds,
                    "images_per_s": n / seconds if seconds > 0 else None,
                }
            )
    return {
        "n": n,
        "clean_acc": clean_acc,
        "robust": results,
        "attacks": {a.name: a.description for a in attacks},
    }


def adversarial_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    eps: float,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reporter: Reporter | None = None,
    precision: str = "fp32",
) -> dict:
    """Attack float images ``x`` in batches; return clean and adversarial images and predictions
    (on the CPU): ``{"clean", "adversarial", "labels", "clean_pred", "adv_pred"}``."""
    reporter = reporter or Reporter()
    device = torch.device(device)
    attack = attack if isinstance(attack, Attack) else get_attack(attack)
    model = _prepare(model, device)
    logits = _Logits(model, precision, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    adv, clean_pred, adv_pred = [], [], []
    reporter.start(f"{attack.name} eps={format_eps(eps)}", x.shape[0], unit="img")
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        xa = attack(logits, xb, yb, eps, gen=gen, seed=seed, log=reporter.warn)
        with torch.no_grad():
            clean_pred.append(logits(xb).argmax(1))
            adv_pred.append(logits(xa).argmax(1))
        adv.append(xa)
        reporter.advance(xb.shape[0])
    reporter.finish()
    return {
        "clean": x.cpu(), "adversarial": torch.cat(adv).cpu(), "labels": y.cpu(),
        "clean_pred": torch.cat(clean_pred).cpu(), "adv_pred": torch.cat(adv_pred).cpu(),
    }


def load_test_data(ckpt, dataset: str | None = None, *, split: str = "test", limit: int | None = None,
                   image_size: int | None = None, data_dir=None, download: bool = True) -> ImageData:
    """The split to evaluate ``ckpt`` on: its own dataset unless ``dataset`` is given, at the
    image size it was finetuned at unless ``image_size`` is given; the class counts must match."""
    from ..data.registry import load_dataset, num_classes_of

    name = dataset or ckpt.meta.dataset
    want = ckpt.meta.num_classes
    known = num_classes_of(name)
    if known is not None and known != want:
        raise DataError(
            f"dataset '{name}' has {known} classes but the classifier {ckpt.path} has {want}",
            f"evaluate it on its own dataset ('{ckpt.meta.dataset}') or one with {want} classes",
        )
    if image_size is None:
        image_size = ckpt.meta.config.get("image_size")
    data = load_dataset(name, split, data_dir=data_dir, download=download, limit=limit, image_size=image_size)
    if data.num_classes != want:
        raise DataError(
            f"dataset '{name}' has {data.num_classes} classes but the classifier {ckpt.path} has {want}",
            f"evaluate it on its own dataset ('{ckpt.meta.dataset}') or one with {want} classes",
        )
    return data
