"""Import an original AdvCL pretraining checkpoint (``epoch_N.ckpt``) as an advcl encoder.

The authors save ``{'model': state_dict, 'epoch': N, 'rng_state': ...}`` from
``nn.DataParallel`` (keys start with ``module.``), with the model of
``models/resnet_cifar_multibn_ensembleFC.py``. It is read with ``torch.load(weights_only=True)``
(no code runs), wrapper prefixes are stripped, and every tensor is mapped strictly:

==========================================  =================================================
original                                     advcl
==========================================  =================================================
``conv1.weight``                             ``backbone.conv1.weight``
``bn1.bn_list.{i}.*``                        ``backbone.bn1.sets.{set i}.*``
``layer{s}.{b}.conv1/conv2.weight``          ``backbone.layers.{s-1}.{b}.conv1/conv2.weight``
``layer{s}.{b}.bn1/bn2.bn_list.{i}.*``       ``backbone.layers.{s-1}.{b}.bn1/bn2.sets.{set i}.*``
``layer{s}.{b}.downsample.conv.weight``      ``backbone.layers.{s-1}.{b}.shortcut_conv.weight``
``layer{s}.{b}.downsample.bn.bn_list.{i}.*`` ``backbone.layers.{s-1}.{b}.shortcut_bn.sets.{set i}.*``
``head_proj.{0,1,3}.*``                      ``proj.net.{0,1,3}.*``
``fc_002 ... fc_500.*``                      ``pseudo.k2 ... pseudo.k500.*``
``head_pred.*``, ``head_ce.*``               dropped (the loss never uses them)
==========================================  =================================================

BN set ``i`` is 0 "normal", 1 "pgd", 2 "pgd_ce". A key that maps nowhere, a tensor of our model
that nothing maps to, or a shape that differs fails the import with the list of offenders
(the authors' own finetuning loads with ``strict=False``, which can silently load nothing).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .checkpoint import check_finite, refuse_empty, save_model, sha256_file
from .errors import CheckpointError, UsageError, os_error
from .models import ARCHS, create_model

BN_SET_NAMES = ("normal", "pgd", "pgd_ce")
DROPPED_HEADS = ("head_pred.", "head_ce.")
_BN = r"bn_list\.(?:(?P<set>\d+)\.)?(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)"
_RULES = [
    (re.compile(r"conv1\.weight"), "backbone.conv1.weight"),
    (re.compile(r"bn1\." + _BN), "backbone.bn1.sets.{set}.{param}"),
    (re.compile(r"layer(?P<stage>\d)\.(?P<block>\d+)\.(?P<conv>conv1|conv2)\.weight"), "backbone.layers.{stage}.{block}.{conv}.weight"),
    (re.compile(r"layer(?P<stage>\d)\.(?P<block>\d+)\.(?P<bn>bn1|bn2)\." + _BN), "backbone.layers.{stage}.{block}.{bn}.sets.{set}.{param}"),
    (re.compile(r"layer(?P<stage>\d)\.(?P<block>\d+)\.downsample\.conv\.weight"), "backbone.layers.{stage}.{block}.shortcut_conv.weight"),
    (re.compile(r"layer(?P<stage>\d)\.(?P<block>\d+)\.downsample\.bn\." + _BN), "backbone.layers.{stage}.{block}.shortcut_bn.sets.{set}.{param}"),
    (re.compile(r"head_proj\.(?P<i>[013])\.(?P<param>\w+)"), "proj.net.{i}.{param}"),
    (re.compile(r"fc_(?P<k>\d+)\.(?P<param>weight|bias)"), "pseudo.k{k}.{param}"),
]


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def map_key(key: str) -> str | None:
    """Our name for an original key (prefix already stripped); None if it maps nowhere."""
    for pattern, template in _RULES:
        m = pattern.fullmatch(key)
        if m:
            g = m.groupdict()
            if "stage" in g:
                g["stage"] = str(int(g["stage"]) - 1)
            if "param" in g and "set" in g:
                index = int(g["set"] or 0)
                if index >= len(BN_SET_NAMES):
                    return None
                g["set"] = BN_SET_NAMES[index]
            if "k" in g:
                g["k"] = str(int(g["k"]))
            return template.format(**g)
    return None


def read_original(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict (prefixes stripped) and the other entries of an original checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a checkpoint file", "name the .ckpt file in it")
    if not path.is_file():
        raise UsageError(f"no such checkpoint file: {path}")
    try:
        refuse_empty(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except OSError as e:
        raise os_error(e, path, "read") from None
    except Exception as e:  # torch's own messages run over several lines and advise weights_only=False: not repeated
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:
            raise CheckpointError(
                f"{path} holds objects other than tensors ({found.group(1)}); refused to load it, since unpickling "
                "them could run code",
                "advcl reads only tensors and plain values from a .ckpt (the authors' epoch_N.ckpt files hold nothing else)",
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__})",
                              "is it the authors' epoch_N.ckpt?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict")
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no state dict of tensors ('model' entry)")
    extra = {k: v for k, v in obj.items() if k not in ("model", "state_dict") and isinstance(v, (int, float, str))}
    return {_strip(k): v for k, v in state.items()}, extra


def _infer_config(state: dict[str, torch.Tensor], path: Path) -> dict:
    conv1 = state.get("conv1.weight")
    if conv1 is None:
        raise CheckpointError(f"{path} has no conv1.weight: not an AdvCL ResNet checkpoint")
    blocks = tuple(
        len({m.group(2) for k in state if (m := re.match(rf"layer({s})\.(\d+)\.", k))}) for s in range(1, 5)
    )
    arch = next((a for a, (w, b) in ARCHS.items() if w == conv1.shape[0] and b == blocks), None)
    if arch is None:
        raise CheckpointError(f"{path}: no known architecture has stem width {conv1.shape[0]} and blocks {blocks}")
    indices = {int(m.group(1)) for k in state if (m := re.search(r"\.bn_list\.(\d+)\.", k))}
    if indices and max(indices) >= len(BN_SET_NAMES):
        raise CheckpointError(f"{path} has {max(indices) + 1} batch-norm sets; advcl knows {len(BN_SET_NAMES)}")
    proj = state.get("head_proj.3.weight")
    return {
        "arch": arch,
        "bn_sets": BN_SET_NAMES[: max(indices) + 1] if indices else ("normal",),
        "proj_dim": int(proj.shape[0]) if proj is not None else None,
        "pseudo_ks": tuple(sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"fc_(\d+)\.weight", k)))),
    }


def import_original(path: str | Path, out: str | Path, *, dataset: str = "cifar10", eps: float = 8 / 255) -> Path:
    """Convert the original checkpoint at ``path`` into an encoder checkpoint at ``out``."""
    path = Path(path)
    state, extra = read_original(path)
    config = _infer_config(state, path)
    model = create_model(**config)
    want = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state.items():
        if key.startswith(DROPPED_HEADS):
            continue
        new = map_key(key)
        if new is None or new not in want:
            unmatched.append(key)
        else:
            mapped[new] = value
    missing = sorted(set(want) - set(mapped))
    wrong = sorted(f"{k} {tuple(mapped[k].shape)} != {tuple(want[k].shape)}" for k in mapped if mapped[k].shape != want[k].shape)
    if unmatched or missing or wrong:
        parts = [f"{label}: {', '.join(keys)}" for label, keys in (
            ("unmatched", sorted(unmatched)), ("missing", missing), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{path} does not map onto an advcl {config['arch']} encoder; " + "; ".join(parts))
    check_finite({key: value for key, value in state.items() if not key.startswith(DROPPED_HEADS)}, str(path))
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in mapped.items()}, strict=True)
    return save_model(
        out, model, kind="encoder", method="advcl", dataset=dataset, eps=eps,
        config={"imported_from": path.name, **extra}, parent=sha256_file(path), rescue=True,
    )
