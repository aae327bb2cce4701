"""The model zoo: a manifest of named checkpoints on the Hugging Face Hub, pull/push, model cards.

``pull(name)`` returns the local path of a verified checkpoint; ``load_model(name_or_path)``
returns the classifier ready to evaluate, as RobustBench's ``load_model`` does for its zoo.
"""

from __future__ import annotations

from pathlib import Path

from .manifest import Entry, Manifest, Metric, load_manifest, manifest_path, write_manifest


def pull(name: str, *, endpoint: str | None = None, manifest: str | Path | None = None, force_download: bool = False, reporter=None) -> Path:
    """Local path of the checkpoint ``name`` (a zoo name or ``hf:ORG/REPO[@REV][:FILE]``).

    Downloads into the Hugging Face cache at the pinned revision when needed, checks the sha256
    the manifest pins, and validates the file as a checkpoint. ``endpoint`` and ``manifest``
    default to ADVCL_HF_ENDPOINT / HF_ENDPOINT and ADVCL_ZOO_MANIFEST / the shipped manifest.
    """
    from .hub import fetch

    return fetch(name, endpoint=endpoint, manifest=manifest, force_download=force_download, reporter=reporter).path


def resolve(name_or_path: str | Path, *, endpoint: str | None = None, manifest: str | Path | None = None, reporter=None) -> Path:
    """The local checkpoint file for a path, else for a zoo or ``hf:`` name (pulled), else a
    CheckpointError. A value with a '/' or ending in .safetensors is a path, never a name."""
    from ..errors import CheckpointError, require_file

    value = str(name_or_path)
    path = Path(value).expanduser()
    if path.exists() or path.is_symlink():  # a dangling link or a loop of links is a path too
        return require_file(path, "checkpoint file", error=CheckpointError)
    if value.startswith("hf:") or ("/" not in value and not value.endswith(".safetensors")):
        return pull(value, endpoint=endpoint, manifest=manifest, reporter=reporter)
    raise CheckpointError(f"no such checkpoint file: {value}")


def load_model(name_or_path: str | Path, device: str = "cpu", kind: str = "classifier", bn_set: str | None = None):
    """``name_or_path`` (a checkpoint path or a zoo name) as an ``nn.Module`` in eval mode that
    takes RGB images in [0, 1] (there is no normalisation to apply).

    ``kind="classifier"`` (the default) returns the classifier: images to logits.
    ``kind="encoder"`` returns a feature extractor: images to the backbone's features (512 for
    resnet18), through BN set ``bn_set`` (default ``pgd`` when the encoder has it, else its only
    set: the set finetuning starts from); a classifier's head is left out."""
    from ..checkpoint import load_checkpoint
    from ..errors import UsageError
    from ..models import backbone_with_bn_set

    if kind not in ("classifier", "encoder"):
        raise UsageError(f"kind must be 'classifier' or 'encoder', not {kind!r}")
    ckpt = load_checkpoint(resolve(name_or_path), kind="classifier" if kind == "classifier" else None)
    net = ckpt.build(device)
    if kind == "classifier":
        return net
    sets = net.config.bn_sets
    return backbone_with_bn_set(net, bn_set or ("pgd" if "pgd" in sets else sets[0])).to(device).eval()


__all__ = ["Entry", "Manifest", "Metric", "load_manifest", "load_model", "manifest_path", "pull", "resolve", "write_manifest"]
