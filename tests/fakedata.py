"""Tiny datasets in their real on-disk formats, for tests.

Every writer is deterministic: ``fake_split(n, num_classes, size, seed)`` gives the exact images
(uint8, N x 3 x size x size) and labels it writes, so a test can compare what a loader returns
with what was written. The train split uses ``seed``, the test split ``seed + 1``.

torchvision checks the md5 sums of the real archives; ``allow_fake_archives(monkeypatch)`` makes
its integrity check test only that the files exist, so its real loaders read these files.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np


def fake_split(n: int, num_classes: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, size, size), labels int64 (n,)): random pixels, every class used."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    return images, labels


def allow_fake_archives(monkeypatch) -> None:
    """Let torchvision's CIFAR/STL loaders accept files whose md5 differs from the real ones."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(stl10, "check_integrity", exists)


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, n_train: int = 50, n_test: int = 20, *, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py``: data_batch_1..5 (the train images split over five files),
    test_batch and batches.meta, as pickled dicts with ``data`` (N, 3072) uint8 and ``labels``."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = fake_split(n_train, 10, 32, seed)
    parts = np.array_split(np.arange(n_train), 5)
    for k, idx in enumerate(parts, start=1):
        _pickle(folder / f"data_batch_{k}", {
            "batch_label": f"training batch {k} of 5",
            "data": images[idx].reshape(len(idx), 3072),
            "labels": labels[idx].tolist(),
            "filenames": [f"train_{i}.png" for i in idx],
        })
    images, labels = fake_split(n_test, 10, 32, seed + 1)
    _pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "data": images.reshape(n_test, 3072),
        "labels": labels.tolist(),
        "filenames": [f"test_{i}.png" for i in range(n_test)],
    })
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    return Path(root)


def write_cifar100(root, n_train: int = 200, n_test: int = 100, *, seed: int = 0) -> Path:
    """``root/cifar-100-python``: train, test (``data``, ``fine_labels``, ``coarse_labels``) and meta
    (``fine_label_names``, ``coarse_label_names``). Coarse label = fine label // 5."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = fake_split(n, 100, 32, s)
        _pickle(folder / name, {
            "batch_label": f"{name} batch",
            "data": images.reshape(n, 3072),
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        })
    _pickle(folder / "meta", {
        "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    })
    return Path(root)


def write_stl10(root, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 2, *, seed: int = 0) -> Path:
    """``root/stl10_binary``: {train,test}_X.bin (96x96 images, each channel stored column-major),
    {train,test}_y.bin (labels 1..10, uint8), unlabeled_X.bin and class_names.txt."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)

    def write_x(path, images):
        path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())

    for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = fake_split(n, 10, 96, s)
        write_x(folder / f"{name}_X.bin", images)
        (folder / f"{name}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    write_x(folder / "unlabeled_X.bin", fake_split(n_unlabeled, 10, 96, seed + 2)[0])
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return Path(root)


def write_imagefolder(
    root, classes=("cat", "dog", "frog"), n_train: int = 9, n_test: int = 6, *, size: int = 32, seed: int = 0
) -> Path:
    """``root/{train,test}/CLASS/NNNNN.png``: RGB PNGs of size x size. Image k of a split is
    ``fake_split(n, len(classes), size, seed)[0][k]`` stored under its label's class folder;
    ImageFolder reads them sorted by class, then by k (a stable sort of the labels)."""
    from PIL import Image

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = fake_split(n, len(classes), size, s)
        for c in classes:
            (Path(root) / split / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(images[k].transpose(1, 2, 0)).save(Path(root) / split / classes[labels[k]] / f"{k:05d}.png")
    return Path(root)


def write_cifar_c(root, n: int = 2, num_classes: int = 10, *, folder: str = "CIFAR-10-C", seed: int = 0,
                  repeat_labels: bool = True) -> tuple[Path, dict, np.ndarray]:
    """``root/folder``: one ``<corruption>.npy`` per CIFAR-10-C corruption, uint8 (5 n, 32, 32, 3)
    (severities 1..5 stacked, random pixels), and ``labels.npy`` (the n labels, repeated for each
    severity as in the published files unless ``repeat_labels`` is False). Returns the folder,
    the arrays written (by corruption) and the n labels."""
    from advcl_cli.data.corruptions import CORRUPTIONS

    path = Path(root) / folder
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for c in CORRUPTIONS:
        arrays[c] = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(path / f"{c}.npy", arrays[c])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
    np.save(path / "labels.npy", np.tile(labels, 5) if repeat_labels else labels)
    return path, arrays, labels
