"""Common-corruption test sets: ``cifar10-c`` and ``cifar100-c`` from their published files, and
``digits-c`` made offline.

The published layout (Hendrycks & Dietterich, ICLR 2019, the data RobustBench and the RobustSSL
benchmark use): a folder with one ``<corruption>.npy`` per corruption, uint8 (5 N, 32, 32, 3),
the N test images corrupted at severity 1, then at 2, ..., then at 5, and one ``labels.npy``
(N labels, or 5 N: the N repeated per severity). N is read from the files (10,000 in the real
ones). The archives (``CIFAR-10-C.tar``, ``CIFAR-100-C.tar``) hold that folder; they are
downloaded from zenodo into the data folder when missing, or read from ``--corruptions DIR``.
Each (corruption, severity) split is read on demand from a memory-mapped file, so a 75-split
evaluation never holds more than one split in memory.

``digits-c`` is the digits test split corrupted by ``data.corrupt`` (our own tensor-code
approximations of the 15 corruptions, not the published code), seeded per (seed, corruption,
severity): the same seed always gives the same images. Its CA is a smoke test of the pipeline,
not a number to compare with CIFAR-10-C.
"""

from __future__ import annotations

import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import DataError, DownloadError
from .augment import to_float
from .corrupt import corrupt
from .registry import OFFLINE_HINT, ImageData, _resize, default_data_dir, load_dataset

# RobustBench's order of the 15 CIFAR-10-C corruptions (the four extra CIFAR-100-C files are not used)
CORRUPTIONS = (
    "shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness", "fog",
    "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression", "elastic_transform",
)
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Published:
    url: str
    folder: str  # the archive's top folder
    num_classes: int

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


PUBLISHED = {
    "cifar10-c": Published("https://zenodo.org/records/2535967/files/CIFAR-10-C.tar", "CIFAR-10-C", 10),
    "cifar100-c": Published("https://zenodo.org/records/3555552/files/CIFAR-100-C.tar", "CIFAR-100-C", 100),
}
CLEAN = {"cifar10-c": "cifar10", "cifar100-c": "cifar100", "digits-c": "digits"}


def corruption_set_names() -> list[str]:
    return list(CLEAN)


def corruptions_for(dataset: str) -> str | None:
    """The corruption set of a clean dataset (``cifar10`` -> ``cifar10-c``), or None."""
    return {clean: name for name, clean in CLEAN.items()}.get(str(dataset).strip().lower())


@dataclass(frozen=True)
class CorruptionSet:
    """The corruptions x severities of one test split; ``split(c, s)`` reads (or makes) one of them."""

    name: str
    num_classes: int
    classes: list[str]
    n: int  # images per split
    where: str  # the folder read, or how the set is made
    read: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]  # -> uint8 (n, 3, H, W), int64 (n,)
    corruptions: tuple[str, ...] = CORRUPTIONS

    def split(self, corruption: str, severity: int) -> ImageData:
        if corruption not in self.corruptions or severity not in SEVERITIES:
            raise DataError(f"no split {corruption!r} at severity {severity!r} in {self.name}",
                            f"corruptions: {', '.join(self.corruptions)}; severities 1-5")
        images, labels = self.read(corruption, severity)
        return ImageData(images, labels, self.num_classes, self.classes, f"{self.name}/{corruption}/{severity}")

    def __iter__(self) -> Iterator[tuple[str, int, ImageData]]:
        for c in self.corruptions:
            for s in SEVERITIES:
                yield c, s, self.split(c, s)

    def __len__(self) -> int:
        return len(self.corruptions) * len(SEVERITIES)


def load_corruptions(name: str, *, folder: str | Path | None = None, data_dir: str | Path | None = None,
                     download: bool = True, limit: int | None = None, image_size: int | None = None,
                     seed: int = 0) -> CorruptionSet:
    """A corruption set by name: ``cifar10-c``, ``cifar100-c`` (from ``folder``, else from
    ``data_dir``, downloaded there when missing) or ``digits-c`` (made here, seeded).
    ``limit`` keeps the first images of every split, ``image_size`` resizes them."""
    key = str(name).strip().lower()
    if key not in CLEAN:
        raise DataError(f"unknown corruption set {name!r}", "known corruption sets: " + ", ".join(CLEAN))
    if key == "digits-c":
        return _digits_c(limit, image_size, seed)
    spec = PUBLISHED[key]
    path = _find_folder(key, spec, folder, data_dir, download)
    n, labels = _check_folder(path, key, spec)
    keep = n if limit is None else min(limit, n)

    def read(corruption: str, severity: int):
        arr = np.load(path / f"{corruption}.npy", mmap_mode="r")
        block = np.array(arr[(severity - 1) * n : (severity - 1) * n + keep])  # a copy: the memmap is read-only
        images = torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
        y = labels[(severity - 1) * n :][:keep] if len(labels) == 5 * n else labels[:keep]
        images = _resize(images, image_size) if image_size is not None else images
        return images, torch.from_numpy(y.astype(np.int64))

    classes = [str(i) for i in range(spec.num_classes)]
    return CorruptionSet(key, spec.num_classes, classes, keep, str(path), read)


def _find_folder(key: str, spec: Published, folder, data_dir, download: bool) -> Path:
    """The folder holding the .npy files: ``folder`` (or its ``CIFAR-10-C/``), else
    ``data_dir/CIFAR-10-C``, extracted from the archive there (downloaded when allowed)."""
    layout = f"<corruption>.npy files and labels.npy, as in {spec.archive} from {spec.url}"
    if folder is not None:
        path = Path(folder).expanduser()
        if not (path / "labels.npy").exists() and (path / spec.folder).is_dir():
            path = path / spec.folder
        if not path.is_dir():
            raise DataError(f"corruption folder {path} does not exist", f"give the folder that holds the {layout}")
        return path
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    path, archive = root / spec.folder, root / spec.archive
    place = f"place {spec.archive} from {spec.url} (or its extracted {spec.folder}/) in {root}, or pass --corruptions DIR"
    if path.is_dir():
        return path
    if not archive.is_file() and not download:
        raise DataError(f"{key} files not found in {path}", f"{place}, allow downloading, or {OFFLINE_HINT}")
    try:
        if not archive.is_file():
            _download(spec.url, archive)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # no links out of root
        with tarfile.open(archive) as tar:
            tar.extractall(root, **safe)
    except (OSError, RuntimeError, ValueError, EOFError, tarfile.TarError, urllib.error.URLError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DownloadError(f"could not get {key} from {spec.url} into {root}: {reason}",
                            f"{place}, or {OFFLINE_HINT}") from e
    if not path.is_dir():
        raise DataError(f"{archive} holds no {spec.folder}/ folder", f"{place}")
    return path


def _download(url: str, path: Path) -> None:
    """``url`` to ``path`` through a temporary name, so an interrupted download leaves no archive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)
    part.replace(path)


def _check_folder(path: Path, key: str, spec: Published) -> tuple[int, np.ndarray]:
    """Images per split and the labels, after checking every file's presence, dtype and shape."""
    hint = f"get the {key} files again ({spec.url}) or pass the right --corruptions DIR"
    missing = [f"{c}.npy" for c in CORRUPTIONS if not (path / f"{c}.npy").is_file()]
    if not (path / "labels.npy").is_file():
        missing.append("labels.npy")
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise DataError(f"{path} lacks {shown}", hint)
    shapes = {}
    for c in CORRUPTIONS:
        try:
            arr = np.load(path / f"{c}.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path / f'{c}.npy'} is not a readable .npy file: {' '.join(str(e).split())}", hint) from e
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[0] % 5:
            raise DataError(f"{c}.npy in {path} holds {arr.dtype} {tuple(arr.shape)}, not uint8 (5 N, H, W, 3)", hint)
        shapes[c] = arr.shape
    first = shapes[CORRUPTIONS[0]]
    odd = next((c for c in CORRUPTIONS if shapes[c] != first), None)
    if odd is not None:
        raise DataError(f"{odd}.npy holds {shapes[odd]} but {CORRUPTIONS[0]}.npy {first} in {path}", hint)
    n = first[0] // 5
    try:
        labels = np.asarray(np.load(path / "labels.npy", allow_pickle=False))
    except (OSError, ValueError) as e:
        raise DataError(f"{path / 'labels.npy'} is not a readable .npy file: {' '.join(str(e).split())}", hint) from e
    if labels.ndim != 1 or len(labels) not in (n, 5 * n) or labels.dtype.kind not in "iu":
        raise DataError(f"labels.npy in {path} holds {labels.dtype} {labels.shape} but the images are 5 x {n}",
                        f"labels.npy needs {n} or {5 * n} whole-number labels; {hint}")
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise DataError(f"labels.npy in {path} has labels outside 0..{spec.num_classes - 1}", hint)
    return n, labels


def _digits_c(limit: int | None, image_size: int | None, seed: int) -> CorruptionSet:
    clean = load_dataset("digits", "test", limit=limit, image_size=image_size)
    x = to_float(clean.images)

    def read(corruption: str, severity: int):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 10 * CORRUPTIONS.index(corruption) + severity)
        y = corrupt(x, corruption, severity, gen)
        return (y * 255).round_().clamp_(0, 255).to(torch.uint8), clean.labels.clone()

    where = f"the digits test split corrupted by advcl's tensor-code approximations, seed {seed}"
    return CorruptionSet("digits-c", clean.num_classes, clean.classes, len(clean), where, read)
