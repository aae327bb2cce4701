"""Dataset registry: a dataset spec -> a split as uint8 image tensors.

Specs: ``cifar10``, ``cifar100``, ``stl10`` (read by torchvision's own dataset classes from
``data_dir``, downloaded there when missing), ``digits`` and ``imagefolder:PATH``.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16), scaled to
0..255, upsampled bilinearly to 32x32 (or ``image_size``) and repeated to 3 channels. It needs no
download and ignores ``data_dir``. Its split is fixed: a permutation drawn from
``numpy.random.default_rng(0)``; its first 1437 images are ``train``, its last 360 ``test``.

``imagefolder:PATH`` needs ``PATH/train/CLASS/*`` and ``PATH/test/CLASS/*``; images are read as
RGB and resized to ``image_size`` (default 32) square. Class indices follow the sorted class
folders of ``PATH/train``.

Loading never prints on stdout (torchvision's messages go to stderr).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import os
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advcl_cli.errors import DataError, DownloadError, os_error

# name -> number of classes (None: known only after loading)
_KNOWN = {"cifar10": 10, "cifar100": 100, "stl10": 10, "digits": 10}
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
DIGITS_TRAIN = 1437  # the first 1437 of the fixed permutation; the other 360 are the test split
OFFLINE_HINT = "run offline with --dataset digits"


@dataclass(frozen=True)
class ImageData:
    """One split of a dataset: uint8 images (N, 3, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    classes: list[str]
    name: str

    def to(self, device) -> "ImageData":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def dataset_names() -> list[str]:
    return [*_KNOWN, "imagefolder:PATH"]


def default_data_dir() -> Path:
    """``$ADVCL_DATA_DIR`` if set, else ``~/.cache/advcl/data``."""
    env = os.environ.get("ADVCL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "advcl" / "data"


def _parse(name: str) -> tuple[str, str | None]:
    """Return (key, path): key is a known name or 'imagefolder'."""
    spec = str(name).strip()
    if spec.lower().startswith("imagefolder:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise DataError("dataset 'imagefolder:' has no folder", "write imagefolder:PATH with PATH/train and PATH/test")
        return "imagefolder", path
    key = spec.lower()
    if key in _KNOWN:
        return key, None
    if key == "imagefolder":
        raise DataError("dataset 'imagefolder' needs a folder", "write imagefolder:PATH with PATH/train and PATH/test")
    hint = "known datasets: " + ", ".join(dataset_names())
    close = difflib.get_close_matches(key, [*_KNOWN, "imagefolder"], n=1)
    if close:
        hint = f"did you mean '{close[0]}'? " + hint
    raise DataError(f"unknown dataset {spec!r}", hint)


def num_classes_of(name: str) -> int | None:
    """The class count of a dataset known without loading it (None for imagefolder)."""
    key, _ = _parse(name)
    return _KNOWN.get(key)


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    limit: int | None = None,
    image_size: int | None = None,
) -> ImageData:
    """Load one split of a dataset as uint8 (N, 3, H, W) images on the CPU."""
    key, path = _parse(name)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}", "use 'train' or 'test'")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a whole number >= 1, got {limit!r}", "drop the limit or give a positive count")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image size must be a whole number >= 1, got {image_size!r}", "use e.g. 32")

    if key == "digits":
        images, labels, classes = _load_digits(split, image_size or 32, limit)
    elif key == "imagefolder":
        images, labels, classes = _load_imagefolder(Path(path).expanduser(), split, image_size or 32)
    else:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        images, labels, classes = _load_torchvision(key, split, root, download)

    if limit is not None:
        images, labels = images[:limit].clone(), labels[:limit].clone()  # let the full split go
    if image_size is not None:
        images = _resize(images, image_size)
    spec = key if path is None else str(name).strip()
    return ImageData(images.contiguous(), labels.to(torch.int64).contiguous(), len(classes), list(classes), spec)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size): bilinear, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = []
    for chunk in images.split(2048):
        y = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def _load_digits(split: str, size: int, limit: int | None = None):
    """The digits split at ``size`` pixels (only its first ``limit`` images are resized)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(len(bunch.target))
    idx = (perm[:DIGITS_TRAIN] if split == "train" else perm[DIGITS_TRAIN:])[:limit]
    x = torch.from_numpy(bunch.images[idx].astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.round_().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(bunch.target[idx].astype(np.int64))
    return x, labels, [str(i) for i in range(10)]


def _load_torchvision(key: str, split: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[key])
    if root.exists() and not root.is_dir():
        raise DataError(f"the data folder {root} is a file", "pass a folder as --data-dir (or $ADVCL_DATA_DIR)")
    folder = root / cls.base_folder
    needed = [name for name, _ in cls.train_list + cls.test_list]
    present = all((folder / f).is_file() for f in needed)
    place = f"place {cls.filename} in {root} (or its extracted {cls.base_folder}/ there)"
    archive = root / cls.filename
    damaged = not present and archive.is_file() and not _archive_ok(archive, cls.tgz_md5)
    checksum = f"{archive} is there but its checksum failed: it is damaged or incomplete"
    replace = f"delete it (advcl then downloads it again) or put a good copy there, or {OFFLINE_HINT}"
    if damaged and not download:
        raise DataError(checksum, replace)
    if not present and not download:
        raise DataError(f"{key} files not found in {folder}", f"{place}, allow downloading, or {OFFLINE_HINT}")
    kwargs = {"split": split} if key == "stl10" else {"train": split == "train"}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            ds = cls(str(root), download=not present, **kwargs)
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, tarfile.TarError, pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES,
                                                  errno.EPERM, errno.ENOTDIR):  # the folder, not the download
            raise os_error(e, e.filename or root) from e
        if present:
            raise DataError(
                f"{key} files in {folder} are unreadable or corrupted: {reason}",
                f"delete {folder} to download it again, or {place}",
            ) from e
        if damaged:  # torchvision tried to fetch a good copy and could not
            raise DownloadError(f"{checksum}, and a new copy could not be downloaded from {cls.url}: {reason}",
                                replace) from e
        raise DownloadError(
            f"could not download {key} from {cls.url} into {folder}: {reason}",
            f"{place} and run again, or {OFFLINE_HINT}",
        ) from e

    if key == "stl10":  # .data is (N, 3, 96, 96) already
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        labels = torch.from_numpy(ds.labels.astype(np.int64))
        classes = list(getattr(ds, "classes", None) or _STL10_CLASSES)
    else:  # .data is (N, 32, 32, 3)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        classes = list(ds.classes)
    return images, labels, classes


def _archive_ok(path: Path, md5: str) -> bool:
    """Whether the archive at ``path`` has the published md5 (torchvision's own check)."""
    from torchvision.datasets.utils import check_integrity

    return check_integrity(str(path), md5)


def _load_imagefolder(path: Path, split: str, size: int):
    from PIL import Image
    from torchvision.datasets.folder import find_classes

    train_dir, split_dir = path / "train", path / split
    layout = "lay it out as PATH/train/CLASS/img.png and PATH/test/CLASS/img.png"
    if not (train_dir.is_dir() and (path / "test").is_dir()):
        raise DataError(f"image folder {path} has no train/ and test/ subfolders", layout)
    try:
        classes, class_to_idx = find_classes(train_dir)  # class indices always come from train/
        unknown = sorted(set(find_classes(split_dir)[0]) - set(classes))
        samples = _image_files(split_dir, class_to_idx)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image folder {split_dir}: {' '.join(str(e).split())}", layout) from e
    if unknown:
        raise DataError(f"classes {unknown} of {split_dir} are not in {train_dir}", "use the same class folders in train/ and test/")
    if not samples:
        raise DataError(f"image folder {split_dir} holds no images", layout)

    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    labels = torch.tensor([target for _, target in samples], dtype=torch.int64)
    for i, (file, _) in enumerate(samples):
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        except (OSError, Image.DecompressionBombError) as e:  # a bomb: a small file of billions of pixels
            raise DataError(f"cannot read image {file}: {' '.join(str(e).split())}", "remove or fix that file") from e
    return images, labels, classes


def _image_files(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(file, class index) of every image under ``root/CLASS/``, sorted within each folder.
    Links are followed, but each folder is read once (a link loop adds nothing), and a name with
    an image suffix that is not a regular file (a FIFO, a device) is a DataError, not a hang."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    seen: set[tuple[int, int]] = set()
    samples = []
    for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                dirs.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs.sort()
            for file in sorted(f for f in files if f.lower().endswith(IMG_EXTENSIONS)):
                path = os.path.join(folder, file)
                if not os.path.isfile(path):
                    raise DataError(f"{path} is not a regular file", "an image folder holds image files only: remove it")
                samples.append((path, index))
    return samples
