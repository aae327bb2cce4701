"""ClusterFit pseudo labels for AdvCL: features -> k-means -> one labels file.

The labels file is one ``.safetensors`` with one int64 tensor ``k{K}`` of shape (N,) per k and
the metadata key ``advcl_pseudo_labels``: a JSON document with ``dataset``, ``split``, ``n``,
``ks`` and ``encoder`` (the sha256 of the encoder checkpoint the features came from, or
``imported:<sha256 of the source file>``). Label ``i`` belongs to image ``i`` of the split in the
order ``advcl_cli.data.load_dataset`` returns it; ``-1`` means "no label" (ignored by the loss).

Clustering: the backbone features (eval mode, BN set ``bn_set``, default the encoder's first set)
are L2-normalised and clustered with scikit-learn's ``KMeans`` (Lloyd, k-means++ start, one
initialisation, ``random_state=seed``) once per k. The authors clustered an ImageNet-pretrained
SimCLR's features; ``advcl pretrain --method simclr`` makes such an encoder for any dataset.

The authors' CIFAR-10 file (a pickled dict of int32 numpy arrays ``pseudo_train_{k}`` and
``pseudo_test_{k}``) is read by ``import_authors_pickle`` through an unpickler that admits only
what numpy arrays need (``_reconstruct``, ``ndarray``, ``dtype``) and refuses any other global
before it is called, so a malicious pickle cannot run code. Only the train labels are kept.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .checkpoint import atomic_write, load_checkpoint, parse_json, refuse_empty, safetensors_bytes, sha256_file, why_not_json
from .data.augment import to_float
from .data.registry import load_dataset, num_classes_of
from .device import resolve_device
from .errors import CheckpointError, DataError, UsageError, os_error, require_file
from .report import Reporter

META_KEY = "advcl_pseudo_labels"
DEFAULT_KS = (2, 10, 50, 100, 500)


@dataclass(frozen=True)
class PseudoLabels:
    labels: dict[int, torch.Tensor]  # k -> int64 (N,)
    meta: dict

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted(self.labels))

    @property
    def n(self) -> int:
        return int(next(iter(self.labels.values())).shape[0])

    def stacked(self) -> torch.Tensor:
        """(len(ks), N) int64, rows in the order of ``ks``."""
        return torch.stack([self.labels[k] for k in self.ks])


def save_labels(path: str | Path, labels: dict[int, torch.Tensor], *, dataset: str, split: str, encoder: str,
                rescue: bool = False) -> Path:
    """Write a labels file atomically; ``labels`` maps k to (N,) integer tensors. ``rescue``:
    see ``checkpoint.atomic_write``."""
    ks = sorted(int(k) for k in labels)
    tensors = {f"k{k}": torch.as_tensor(labels[k]).to(torch.int64).contiguous() for k in ks}
    n = int(next(iter(tensors.values())).shape[0])
    meta = {"dataset": dataset, "split": split, "n": n, "ks": ks, "encoder": encoder}
    doc = {META_KEY: json.dumps(meta)}
    return atomic_write(path, safetensors_bytes(tensors, doc), rescue=rescue)


def load_labels(path: str | Path, n_expected: int | None = None, *, allow_longer: bool = False) -> PseudoLabels:
    """Read and validate a labels file. ``n_expected`` is the dataset size; ``allow_longer``
    accepts a file for the whole split when only its first ``n_expected`` images are used."""
    path = require_file(path, "pseudo-label file", "make one with `advcl pseudo-labels --encoder CKPT`")
    try:
        refuse_empty(path)
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except OSError as e:
        raise os_error(e, path, "read") from None
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a safetensors file: {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} is not an advcl pseudo-label file (no '{META_KEY}' metadata)")
    try:
        meta, why = parse_json(raw), ""
    except ValueError as e:
        meta, why = None, why_not_json(e)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the '{META_KEY}' metadata is not a JSON object{why}",
                              "make the file again with advcl pseudo-labels")
    labels: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"k(\d{1,30})", name)  # a k of thousands of digits is no count Python converts
        if not m or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise CheckpointError(f"{path}: tensor '{name}' is not a k<K> vector of integer labels")
        k, t = int(m.group(1)), t.to(torch.int64)
        if k < 2:
            raise CheckpointError(f"{path}: '{name}' has {k} cluster{'' if k == 1 else 's'}, which labels nothing",
                                  "make labels with k of at least 2")
        if k > t.numel():  # before k reaches torch: a head of 10^12 outputs would be allocated
            raise CheckpointError(f"{path}: '{name}' has {k} clusters for {t.numel()} images",
                                  "make labels with k no larger than the number of images")
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= k):
            raise CheckpointError(f"{path}: labels of '{name}' are outside [-1, {k - 1}]")
        if t.numel() and bool((t == -1).all()):
            raise CheckpointError(f"{path}: '{name}' labels no image (every label is -1)", "make the file again")
        labels[k] = t
    if not labels:
        raise CheckpointError(f"{path} holds no labels")
    lengths = {int(t.shape[0]) for t in labels.values()}
    if len(lengths) != 1:
        raise CheckpointError(f"{path}: the label vectors have different lengths {sorted(lengths)}")
    out = PseudoLabels(labels, meta)
    if n_expected is not None and not (out.n == n_expected or (allow_longer and out.n > n_expected)):
        raise DataError(
            f"{path} has {out.n} labels but the dataset has {n_expected} images",
            f"make labels for this dataset: advcl pseudo-labels --encoder CKPT --dataset {meta.get('dataset', 'NAME')}",
        )
    if n_expected is not None and out.n > n_expected:
        out = PseudoLabels({k: t[:n_expected] for k, t in labels.items()}, meta)
    return out


# --- making labels ------------------------------------------------------------------------


@torch.no_grad()
def extract_features(model, images_uint8: torch.Tensor, *, batch_size: int = 512, bn: str | None = None) -> torch.Tensor:
    """Backbone features (N, D) float32 on the CPU, in eval mode; images stay on their device."""
    was_training = model.training
    model.eval()
    try:
        feats = [model.features(to_float(chunk), bn).float().cpu() for chunk in images_uint8.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(feats)


def kmeans_labels(features: torch.Tensor, k: int, seed: int = 0, *, normalize: bool = True) -> torch.Tensor:
    """k-means cluster index (N,) int64 of ``features``, L2-normalised first unless
    ``normalize=False`` (DynACL++ clusters the raw features)."""
    from sklearn.cluster import KMeans

    n = features.shape[0]
    if not 1 <= k <= n:
        raise DataError(f"cannot make {k} clusters from {n} images", f"use k values of at most {n} (--k)")
    x = torch.nn.functional.normalize(features.float(), dim=1) if normalize else features.float()
    x = x.numpy().astype(np.float32)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed)
    return torch.from_numpy(km.fit_predict(x).astype(np.int64))


# --- the authors' pickle ------------------------------------------------------------------


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1,  # protocol 2 writes an array's bytes as _codecs.encode(text, "latin1")
}


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1":  # any other codec name would make the codec registry import a module
        raise pickle.UnpicklingError(f"refused _codecs.encode with the codec {encoding!r}: only latin1 is allowed")
    return text.encode("latin1")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the globals numpy arrays need and nothing else; refuses before calling anything."""

    def __init__(self, file):
        super().__init__(file)
        self.path = getattr(file, "name", "the pickle")

    def find_class(self, module: str, name: str):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise CheckpointError(
                f"{self.path}: refused to load {module}.{name} from the pickle: only numpy arrays are allowed",
                "the file is not the authors' pseudo-label pickle; do not trust it",
            )
        return make()

    def persistent_load(self, pid):
        raise CheckpointError("refused a persistent id in the pickle: only numpy arrays are allowed")


def read_authors_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """The dict of integer arrays in the authors' pseudo-label pickle, read safely."""
    path = require_file(path, "file")
    try:
        refuse_empty(path)
        with open(path, "rb") as f:
            obj = NumpyOnlyUnpickler(f).load()
    except CheckpointError:
        raise
    except OSError as e:
        raise os_error(e, path, "read") from None
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"{path} is not a readable pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.ndim == 1 for k, v in obj.items()
    ):
        raise CheckpointError(f"{path} is not a dict of integer label arrays")
    return obj


def import_authors_pickle(path: str | Path, out: str | Path, dataset: str = "cifar10") -> Path:
    """Convert the authors' ``pseudo_train_{k}`` arrays into a labels file at ``out``."""
    arrays = read_authors_pickle(path)
    train = {}
    for key, value in arrays.items():
        m = re.fullmatch(r"pseudo_train_(\d+)", key)
        if m:
            train[int(m.group(1))] = torch.from_numpy(value.astype(np.int64))
    if not train:
        raise CheckpointError(f"{path} has no pseudo_train_<k> arrays", "is it the authors' *_pseudo_labels.pkl?")
    return save_labels(out, train, dataset=dataset, split="train", encoder=f"imported:{sha256_file(path)}", rescue=True)


# --- the verb -----------------------------------------------------------------------------


def make_pseudo_labels(settings, encoder: str | Path, out: str | Path | None, reporter=None) -> Path:
    """``advcl pseudo-labels``: features of ``settings.dataset`` (train split) by the encoder
    checkpoint, k-means for every k in ``settings.k``; returns the labels file's path."""
    reporter = reporter or Reporter()
    if not settings.k:
        raise UsageError("--k gives no cluster counts", "give cluster counts of at least 2, e.g. --k 2,10,50,100,500")
    if min(settings.k) < 2:
        k = min(settings.k)
        why = "puts every image in one cluster, so its labels say nothing" if k == 1 else "is not a number of clusters"
        raise UsageError(f"--k {k} {why}", "give cluster counts of at least 2, e.g. --k 2,10,50,100,500")
    num_classes_of(settings.dataset)  # an unknown dataset, before the encoder is read
    device = resolve_device(settings.device)
    ckpt = load_checkpoint(encoder)
    if ckpt.meta.kind == "classifier":
        reporter.log(f"note: {encoder} is a classifier: its head is ignored, the features come from its backbone")
    model = ckpt.build(device)
    bn = settings.bn_set or model.default_bn
    if bn not in model.config.bn_sets:
        raise CheckpointError(f"the encoder has no batch-norm set '{bn}'", f"its sets are: {', '.join(model.config.bn_sets)}")
    data = load_dataset(
        settings.dataset, "train", data_dir=settings.data_dir, download=settings.download,
        limit=settings.limit, image_size=settings.image_size,
    ).to(device)
    if max(settings.k) > len(data):
        raise DataError(f"cannot make {max(settings.k)} clusters from {len(data)} images", f"use k values of at most {len(data)} (--k)")
    reporter.log(f"features of {len(data)} {data.name} images from {Path(encoder).name} (BN set '{bn}')")
    feats = extract_features(model, data.images, batch_size=settings.batch_size, bn=bn)
    labels = {}
    reporter.start("k-means", total=len(settings.k), unit="k")
    for k in sorted(set(settings.k)):
        labels[k] = kmeans_labels(feats, k, seed=settings.seed)
        reporter.advance(1, k=k)
    reporter.finish()
    return save_labels(out or default_labels_path(settings.dataset), labels, dataset=data.name, split="train",
                       encoder=ckpt.sha256, rescue=True)


def default_labels_path(dataset: str) -> Path:
    return Path(f"pseudo-labels-{re.sub(r'[^A-Za-z0-9._-]+', '_', dataset).strip('_')}.safetensors")
