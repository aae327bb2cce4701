"""``advcl attack`` as a library function: adversarial examples of a classifier's first test
images, with their predictions, saved as one safetensors file.

The file holds ``clean`` (float, [0, 1]), ``adversarial``, ``labels``, ``clean_pred`` and
``adv_pred``; its metadata (key ``advcl_attack``) holds the model's path and sha256, the attack
and its settings, eps, the dataset, the accuracies and the class names (an image counts as
robust only if both its clean and its adversarial prediction are right, as in ``evaluate``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attacks import get_attack
from ..checkpoint import Checkpoint, atomic_write, safetensors_bytes
from ..data.augment import to_float
from ..device import resolve_device
from .evaluate import adversarial_examples, load_test_data, robust_correct
from ..report import Reporter

META_KEY = "advcl_attack"


@dataclass
class Attacked:
    tensors: dict[str, torch.Tensor]  # clean, adversarial, labels, clean_pred, adv_pred (CPU)
    meta: dict
    classes: list[str]


def attack_test_images(ckpt: Checkpoint, settings, reporter: Reporter | None = None) -> Attacked:
    """Attack the first ``settings.n`` test images of the classifier ``ckpt`` (``AttackSettings``)."""
    reporter = reporter or Reporter()
    spec = get_attack(settings.attack, settings.norm)
    device = resolve_device(settings.device)
    data = load_test_data(ckpt, settings.dataset, limit=settings.n, image_size=settings.image_size,
                          data_dir=settings.data_dir, download=settings.download, warn=reporter.warn)
    reporter.log(f"{spec.name}: {spec.description}")
    res = adversarial_examples(ckpt.build(device), to_float(data.images), data.labels, spec, settings.eps,
                               device=device, seed=settings.seed, reporter=reporter)
    n = len(data)
    meta = {
        "model": str(ckpt.path),
        "sha256": ckpt.sha256,
        "attack": spec.name,
        "attack_settings": spec.description,
        "eps": settings.eps,
        "norm": settings.norm,
        "dataset": data.name,
        "split": "test",
        "n": n,
        "seed": settings.seed,
        "clean_acc": (res["clean_pred"] == res["labels"]).sum().item() / n,
        "adv_acc": robust_correct(res["clean_pred"], res["adv_pred"], res["labels"]).sum().item() / n,
        "classes": data.classes,
    }
    return Attacked({k: v.contiguous() for k, v in res.items()}, meta, data.classes)


def save_attacked(path: str | Path, attacked: Attacked) -> Path:
    """Write the tensors and their metadata atomically (saved in the temporary folder, and
    named in the error, if ``path`` cannot be written)."""
    doc = {META_KEY: json.dumps(attacked.meta)}
    return atomic_write(path, safetensors_bytes(attacked.tensors, doc), rescue=True)
