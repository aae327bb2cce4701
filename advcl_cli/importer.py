"""Import a published checkpoint (AdvCL, A-InfoNCE, the ACL family, DeACL) as an advcl encoder.

The file is read with ``torch.load(weights_only=True)``: no code in it runs, and a pickle that
holds anything but tensors and plain values is refused. Its state dict is the entry
``state_dict_dual``, ``state_dict`` or ``model`` (looked for in that order, as the RobustSSL
benchmark's loader does) or the file itself. Wrapper prefixes (``module.`` from DataParallel,
``_orig_mod.`` from torch.compile) are stripped. A file holding several networks keeps the
encoder: ``encoder_k.*`` of DynACL's momentum model (the authors release and finetune that
encoder; ``encoder_q.*`` is dropped), ``backbone.*`` of a DeACL (solo-learn Lightning) file
(its teacher ``momentum_backbone.*``, online classifiers and projectors are dropped).

Each source method reads one layout (``SOURCES``); ``--from METHOD`` names it, otherwise it is
detected from the keys (``detect``). Every key of the encoder maps onto one tensor of the
advcl model (names below, after the prefixes), or is dropped by name for a stated reason, or the
import fails listing what did not map, what is missing and what has the wrong shape (the
authors' own loaders use ``strict=False``, which can silently load nothing):

=========================================  ======================================================
published                                  advcl
=========================================  ======================================================
``conv1.weight``                           ``backbone.conv1.weight``
``bn1.<BN>``                               ``backbone.bn1.sets.<set>.*``
``layer{s}.{b}.conv1/conv2.weight``        ``backbone.layers.{s-1}.{b}.conv1/conv2.weight``
``layer{s}.{b}.bn1/bn2.<BN>``              ``backbone.layers.{s-1}.{b}.bn1/bn2.sets.<set>.*``
``layer{s}.{b}.downsample.conv|0.weight``  ``backbone.layers.{s-1}.{b}.shortcut_conv.weight``
``layer{s}.{b}.downsample.bn|1.<BN>``      ``backbone.layers.{s-1}.{b}.shortcut_bn.sets.<set>.*``
``normalize.mean/std``                     the model's ``mean``/``std`` (ModelConfig)
AdvCL: ``head_proj.{0,1,3}.*``             ``proj.net.{0,1,3}.*`` (``mlp2``)
AdvCL: ``fc_002 ... fc_500.*``             ``pseudo.k2 ... pseudo.k500.*``
ACL family: ``fc.fc{1,2,3}.*``             ``proj.fc{1,2,3}.*`` (``mlp3``)
ACL family: ``fc.bn{1,2,3}.<BN>``          ``proj.bn{1,2,3}.sets.<set>.*``
=========================================  ======================================================

``<BN>`` is ``bn_list.{i}.*`` (set ``i`` of a multi-BN layer: the source's ``bn_sets[i]``) or a
BN without an index (``bn_list.*`` or a plain BatchNorm's ``weight`` ...: the source's
``single_bn`` set); ``shortcut.0/1`` is read as ``downsample.0/1``. Two keys for one tensor fail
the import too.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_finite, expected_tensors, read_metadata, refuse_empty, save_model, sha256_file, wrong_dtypes
from .errors import AdvclError, CheckpointError, UsageError, os_error, require_file
from .models import ARCHS, IMAGENET_MEAN, IMAGENET_STD, ModelConfig, create_model

# The DeACL authors' model normalises with CIFAR-10's statistics (solo-learn's
# resnet_add_normalize.py, whatever the dataset).
DEACL_MEAN = (0.4914, 0.4822, 0.4465)
DEACL_STD = (0.247, 0.243, 0.261)
# The architectures a method published checkpoints of: the CIFAR ResNet-18 (and its test width).
# No source published ResNet-34/50, PreAct-ResNet-18 or WideResNet encoders in these layouts.
IMPORTABLE = ("resnet18", "resnet18-tiny")
PSEUDO_HEAD = "the post-processing's pseudo-label head (k-means clusters, not classes; finetuning trains its own)"


@dataclass(frozen=True)
class Source:
    """How one method's published checkpoints are read."""

    method: str  # what the encoder records: it picks the finetuning protocol
    layout: str  # the layout, in messages
    bn_sets: tuple[str, ...]  # set i of a multi-BN layer (bn_list.i)
    single_bn: str  # the set of a file whose BN layers carry no index
    head: str | None = None  # "advcl" (head_proj + fc_XXX), "mlp3" (fc.fc1..fc3), or none
    dropped: tuple[tuple[str, str], ...] = ()  # (a key, or a prefix ending in ".", why it is dropped)
    mean: tuple[float, ...] | None = None  # the normalisation of a file without normalize.mean/std
    std: tuple[float, ...] | None = None
    stem_padding: int = 1

    def set_name(self, index: str | None) -> str | None:
        if index is None:
            return self.single_bn
        return self.bn_sets[int(index)] if int(index) < len(self.bn_sets) else None


_ACL = dict(bn_sets=("normal", "pgd"), single_bn="pgd", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_PRETRAINED = dict(layout="the ACL family's (pretrained, fc.fc1..fc3 head)", head="mlp3", **_ACL)
_POST = dict(layout="DynACL++'s (post-processed, linear fc head)", dropped=(("fc.weight", PSEUDO_HEAD), ("fc.bias", PSEUDO_HEAD)),
             **_ACL)
_ADVCL = dict(layout="AdvCL's (bn_list.0-2, head_proj, fc_XXX)", bn_sets=("normal", "pgd", "pgd_ce"), single_bn="normal",
              head="advcl", dropped=(("head_pred.", "AdvCL's predictor head, unused by its loss"),
                                     ("head_ce.", "AdvCL's 1000-way head, unused by its loss")))
SOURCES: dict[str, Source] = {
    "advcl": Source("advcl", **_ADVCL),
    "a-infonce": Source("a-infonce", **_ADVCL),  # A-InfoNCE's code is AdvCL's with another loss: the same file
    "acl": Source("acl", **_PRETRAINED),
    "acl-air": Source("acl-air", **_PRETRAINED),
    "dynacl": Source("dynacl", **_PRETRAINED),
    "dynacl-air": Source("dynacl-air", **_PRETRAINED),
    "dynacl++": Source("dynacl++", **_POST),
    "dynacl-air++": Source("dynacl-air++", **_POST),
    "deacl": Source("deacl", "DeACL's (backbone.*, single BN)", ("normal",), "normal",
                    mean=DEACL_MEAN, std=DEACL_STD, stem_padding=2),
    # DeACL's teacher: a solo-learn SimCLR (the same network), recorded as the SimCLR encoder it is
    "simclr": Source("simclr", "solo-learn's SimCLR (backbone.*, single BN)", ("normal",), "normal",
                     mean=DEACL_MEAN, std=DEACL_STD, stem_padding=2),
}
# a file holding several networks: the prefix of the encoder, and the others' prefixes with why
# they are dropped
NETWORKS = (
    ("encoder_k.", (("encoder_q.", "DynACL's online encoder (the authors release and finetune the momentum "
                                   "encoder encoder_k)"),)),
    ("backbone.", (("momentum_backbone.", "DeACL's frozen teacher"),
                   ("classifier.", "solo-learn's online linear classifier, a training monitor"),
                   ("classifier_adv.", "solo-learn's online linear classifier, a training monitor"),
                   ("momentum_classifier.", "solo-learn's online linear classifier, a training monitor"),
                   ("projector.", "a projector: the encoder is the backbone"),
                   ("momentum_projector.", "a projector: DeACL's encoder is the backbone"))),
)
# the RobustSSL benchmark's file names (its model zoo), for the hint when --from is needed
PUBLISHED_NAMES = {"acl_ds": "acl", "advcl": "advcl", "ainfonce": "a-infonce", "deacl": "deacl", "dynacl": "dynacl", "dynacl++": "dynacl++",
                   "dynacl_ir": "dynacl-air", "dynacl++_ir": "dynacl-air++"}
WRAPPERS = ("state_dict_dual", "state_dict", "model")

_PARAM = r"(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)"
_BN = r"(?:bn_list\.(?:(?P<set>\d+)\.)?)?" + _PARAM
_LAYER = r"layer(?P<stage>[1-9])\.(?P<block>\d+)\."
_TO_LAYER = "backbone.layers.{stage}.{block}."
_BACKBONE_RULES = [
    (r"conv1\.weight", "backbone.conv1.weight"),
    (r"bn1\." + _BN, "backbone.bn1.sets.{set}.{param}"),
    (_LAYER + r"(?P<conv>conv1|conv2)\.weight", _TO_LAYER + "{conv}.weight"),
    (_LAYER + r"(?P<bn>bn1|bn2)\." + _BN, _TO_LAYER + "{bn}.sets.{set}.{param}"),
    (_LAYER + r"(?:downsample\.conv|downsample\.0|shortcut\.0)\.weight", _TO_LAYER + "shortcut_conv.weight"),
    (_LAYER + r"(?:downsample\.bn|downsample\.1|shortcut\.1)\." + _BN, _TO_LAYER + "shortcut_bn.sets.{set}.{param}"),
]
_HEAD_RULES = {
    "advcl": [(r"head_proj\.(?P<i>[013])\.(?P<param>\w+)", "proj.net.{i}.{param}"),
              (r"fc_(?P<k>\d+)\.(?P<param>weight|bias)", "pseudo.k{k}.{param}")],
    "mlp3": [(r"fc\.(?P<fc>fc[123])\.(?P<param>weight|bias)", "proj.{fc}.{param}"),
             (r"fc\.(?P<bn>bn[123])\." + _BN, "proj.{bn}.sets.{set}.{param}")],
}
_RULES = {head: [(re.compile(p), t) for p, t in _BACKBONE_RULES + _HEAD_RULES.get(head, [])]
          for head in (None, *_HEAD_RULES)}
NORMALIZE = {"normalize.mean": "mean", "normalize.std": "std"}


def source_named(name: str) -> Source:
    """The source of ``--from NAME`` (any letter case); a UsageError lists the choices."""
    key = str(name).strip().lower()
    if key not in SOURCES:
        raise UsageError(f"unknown --from '{name}': choose one of {', '.join(sorted(SOURCES))}")
    return SOURCES[key]


def _resolve(key: str, source: Source) -> tuple[str | None, str | None, bool]:
    """Our name for a published key (prefixes already stripped; None if it maps nowhere), the
    key's BN set index (None: a BN without one) and whether it is a BN key."""
    for pattern, template in _RULES[source.head]:
        m = pattern.fullmatch(key)
        if m:
            g = m.groupdict()
            index, is_bn = g.get("set"), "set" in g
            if "stage" in g:
                g["stage"] = str(int(g["stage"]) - 1)
            if is_bn:
                g["set"] = source.set_name(index)
                if g["set"] is None:
                    return None, index, is_bn
            if "k" in g:
                g["k"] = str(int(g["k"]))
            return template.format(**g), index, is_bn
    return None, None, False


def map_key(key: str, source: Source = SOURCES["advcl"]) -> str | None:
    """Our name for a published key (prefixes already stripped); None if it maps nowhere."""
    return _resolve(key, source)[0]


def read_original(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict (wrapper prefixes stripped) and the file's other plain entries."""
    path = require_file(path, "checkpoint file")
    try:
        meta = read_metadata(path)
    except AdvclError:
        meta = None  # not an advcl checkpoint: what import is for
    if meta is not None:
        raise UsageError(f"{path} is already an advcl checkpoint (a {meta.kind} of {meta.method}): there is nothing "
                         "to import", f"use it as it is, e.g. advcl eval {path}" if meta.kind == "classifier"
                         else f"use it as it is, e.g. advcl finetune {path}")
    try:
        refuse_empty(path)
        with warnings.catch_warnings():  # torch's advice on pickle protocols, with a line of its source: not the user's
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except OSError as e:
        raise os_error(e, path, "read") from None
    except Exception as e:  # torch's own messages run over several lines and advise weights_only=False: not repeated
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:
            raise CheckpointError(
                f"{path} holds objects other than tensors ({found.group(1)}); refused to load it, since unpickling "
                "them could run code",
                "advcl reads only tensors and plain values from a checkpoint (the published ones hold nothing else)",
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__})",
                              "is it a published .pt / .ckpt file?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict")
    wrapper = next((w for w in WRAPPERS if w in obj), None)
    state = obj[wrapper] if wrapper else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        where = f"its '{wrapper}' entry is not" if wrapper else "it has no 'state_dict_dual', 'state_dict' or 'model' entry and is not"
        raise CheckpointError(f"{path} holds no state dict of tensors ({where} one)")
    extra = {k: v for k, v in obj.items() if k not in WRAPPERS and isinstance(v, (int, float, str))} if wrapper else {}
    stripped = {_strip(k): v for k, v in state.items()}
    if len(stripped) < len(state):
        twice = sorted({_strip(k) for k in state if _strip(k) != k} & {k for k in state if _strip(k) == k})
        raise CheckpointError(f"{path} holds some tensors twice, with and without a wrapper prefix (module.): "
                              f"{_listed(twice)}")
    return stripped, extra


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def split_networks(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], str | None]:
    """The encoder's tensors (its prefix stripped), the dropped networks (``prefix*`` -> why),
    the keys outside the encoder that nothing explains (they fail the import) and the prefix."""
    for keep, others in NETWORKS:
        if any(k.startswith(keep) for k in state):
            encoder, dropped, stray = {}, {}, []
            for key, value in state.items():
                other = next((p for p, _ in others if key.startswith(p)), None)
                if key.startswith(keep):
                    encoder[key[len(keep):]] = value
                elif other is not None:
                    dropped[other + "*"] = dict(others)[other]
                else:
                    stray.append(key)
            return encoder, dropped, stray, keep
    return state, {}, [], None


def detect(keys: list[str], network: str | None, path: Path, dropped: dict[str, str] | None = None) -> Source:
    """The source whose layout the keys show (``dropped``: the other networks of the file, from
    ``split_networks``); a UsageError names the candidates when several methods publish the same
    layout (which one decides the finetuning protocol)."""
    if network == "backbone.":  # solo-learn: DeACL's file holds its teacher; a SimCLR's, a projector and no teacher
        simclr = "projector.*" in (dropped or {}) and "momentum_backbone.*" not in (dropped or {})
        return SOURCES["simclr" if simclr else "deacl"]
    if network == "encoder_k.":  # only DynACL trains a momentum encoder
        return SOURCES["dynacl"]
    if any(re.match(r"(head_proj|head_pred|head_ce|fc_\d+)\.", k) or ".bn_list.2." in k for k in keys):
        return SOURCES["advcl"]
    if any(k.startswith("fc.fc1.") for k in keys):
        candidates = ("acl", "acl-air", "dynacl", "dynacl-air")
        what = f"has {SOURCES['acl'].layout} layout, shared by"
    elif "fc.weight" in keys:
        candidates = ("dynacl++", "dynacl-air++")
        what = f"has {SOURCES['dynacl++'].layout} layout, shared by"
    else:
        candidates = tuple(m for m in sorted(SOURCES) if SOURCES[m].head != "advcl")
        what = "has no head that tells which method made it; files without one come from"
    stem = re.sub(r"_(cifar100|cifar10|stl10)$", "", path.stem.lower())
    named = PUBLISHED_NAMES.get(stem)
    hint = (f"it is named like the RobustSSL benchmark's {path.name}: add --from {named}" if named in candidates
            else f"add --from, e.g. advcl import {path.name} --from {candidates[0]}")
    raise UsageError(f"{path} {what} {', '.join(candidates)}: say which one made it with --from (it picks the "
                     "finetuning protocol)", hint)


def _listed(keys: list[str], limit: int = 10) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _normalisation(norm: dict[str, torch.Tensor], source: Source, path: Path, notes: list[str]) -> dict:
    """The model's mean/std: the file's ``normalize`` buffers (the published constants exactly
    when they hold them in float32), else the source's."""
    if not norm:
        if source.mean is not None:
            notes.append(f"{path.name} has no normalize.mean/std: recorded {source.method}'s normalisation "
                         f"(mean {list(source.mean)}, std {list(source.std)})")
        return {"mean": source.mean, "std": source.std}
    if len(norm) == 1:
        raise CheckpointError(f"{path} has normalize.{next(iter(norm))} without normalize."
                              f"{'std' if 'mean' in norm else 'mean'}")
    out = {}
    for name, t in norm.items():
        if tuple(t.shape) != (3,):
            raise CheckpointError(f"{path}: normalize.{name} has shape {tuple(t.shape)}, not (3,) (one value per RGB channel)")
        known = next((c for c in (IMAGENET_MEAN, IMAGENET_STD, DEACL_MEAN, DEACL_STD)
                      if torch.equal(t, torch.tensor(c, dtype=t.dtype))), None)
        out[name] = known or tuple(float(v) for v in t.double())
    if not all(v > 0 for v in out["std"]):
        raise CheckpointError(f"{path}: normalize.std holds a value that is not positive ({list(out['std'])})")
    return out


def _infer_arch(mapped: dict[str, torch.Tensor], path: Path) -> str:
    conv1 = mapped.get("backbone.conv1.weight")
    if conv1 is None:
        raise CheckpointError(f"{path} has no conv1.weight: not a ResNet checkpoint of a published layout")
    if tuple(conv1.shape[1:]) != (3, 3, 3):
        c, h, w = conv1.shape[1:]
        raise CheckpointError(f"{path}: its stem conv1 takes {c} channels with a {h}x{w} kernel; advcl's ResNets have "
                              "the CIFAR stem (RGB, 3x3)", "an ImageNet-style 7x7 stem (the STL-10 models at 96x96) "
                              "cannot be imported")
    blocks = tuple(len({m.group(1) for k in mapped if (m := re.match(rf"backbone\.layers\.{s}\.(\d+)\.", k))})
                   for s in range(4))
    arch = next((a for a in IMPORTABLE if ARCHS[a].stem == conv1.shape[0] and ARCHS[a].blocks == blocks), None)
    if arch is None:
        raise CheckpointError(f"{path}: no importable architecture has stem width {conv1.shape[0]} and blocks {blocks}",
                              f"advcl imports the published layouts of: {', '.join(IMPORTABLE)}")
    return arch


@dataclass
class _Mapped:
    """The published encoder's tensors under advcl's names, and what did not map."""

    tensors: dict[str, torch.Tensor]
    sources: dict[str, str]  # our name -> the published key
    norm: dict[str, torch.Tensor]  # the file's normalize.mean / .std
    unmatched: list[str]
    twice: list[str]
    indices: set[int]  # the batch-norm set indices (bn_list.i) seen
    unindexed: bool  # a batch norm without a set index seen


def _map_encoder(encoder: dict[str, torch.Tensor], src, dropped: dict[str, str], stray: list[str]) -> _Mapped:
    """Each published key renamed by ``src``'s layout (those it drops go to ``dropped``)."""
    m = _Mapped({}, {}, {}, list(stray), [], set(), False)
    for key, value in encoder.items():
        drop = next(((k, why) for k, why in src.dropped if key == k or (k.endswith(".") and key.startswith(k))), None)
        if drop is not None:
            dropped[drop[0] + "*" if drop[0].endswith(".") else drop[0]] = drop[1]
        elif key in NORMALIZE:
            m.norm[NORMALIZE[key]] = value
        else:
            new, index, is_bn = _resolve(key, src)
            if is_bn and index is None:
                m.unindexed = True
            elif is_bn:
                m.indices.add(int(index))
            if new is None:
                m.unmatched.append(key)
            elif new in m.tensors:
                m.twice.append(f"{new} ({m.sources[new]}, {key})")
            else:
                m.tensors[new], m.sources[new] = value, key
    return m


def _model_config(m: _Mapped, src, path: Path, read_as: str) -> dict:
    """The ModelConfig the mapped tensors follow (anything left over is refused later)."""
    if m.indices and m.unindexed:
        raise CheckpointError(f"{path} mixes batch norms with and without a set index (bn_list.i); {read_as}")
    if m.indices and max(m.indices) >= len(src.bn_sets):
        raise CheckpointError(
            f"{path} has {max(m.indices) + 1} batch-norm sets (bn_list.0-{max(m.indices)}); {src.method}'s layout has "
            f"{len(src.bn_sets)} ({', '.join(src.bn_sets)})",
            "an AdvCL checkpoint has 3: --from advcl" if max(m.indices) == 2 else "is --from right?")
    config = {
        "arch": _infer_arch(m.tensors, path),
        "bn_sets": tuple(src.bn_sets[: max(m.indices) + 1]) if m.indices else (src.single_bn,),
        "pseudo_ks": tuple(sorted(int(x.group(1)) for k in m.tensors if (x := re.fullmatch(r"pseudo\.k(\d+)\.weight", k)))),
        "stem_padding": src.stem_padding,
    }
    if "proj.fc3.weight" in m.tensors:
        config.update(proj_dim=int(m.tensors["proj.fc3.weight"].shape[0]), proj_head="mlp3")
    elif "proj.net.3.weight" in m.tensors:
        config.update(proj_dim=int(m.tensors["proj.net.3.weight"].shape[0]), proj_head="mlp2")
    return config


def _check_complete(m: _Mapped, config: dict, path: Path, read_as: str, chosen: bool) -> None:
    """Every tensor of the model mapped once, in its shape and type, and nothing else; the
    tensors the model does not have move from ``m.tensors`` to ``m.unmatched``."""
    want = expected_tensors(ModelConfig(**config))
    m.unmatched += [m.sources.pop(k) for k in [k for k in m.tensors if k not in want]]
    m.tensors = {k: v for k, v in m.tensors.items() if k in want}
    missing = sorted(set(want) - set(m.tensors))
    wrong = sorted(f"{k} {tuple(v.shape)} != {tuple(want[k].shape)}" for k, v in m.tensors.items()
                   if tuple(v.shape) != tuple(want[k].shape))
    dtypes = wrong_dtypes({m.sources[k]: v.dtype for k, v in m.tensors.items()}, {m.sources[k]: want[k] for k in m.tensors})
    if m.unmatched or missing or wrong or m.twice or dtypes:
        parts = [f"{label}: {_listed(keys)}" for label, keys in (
            ("unmatched", sorted(m.unmatched)), ("missing", missing), ("wrong shape", wrong),
            ("wrong type", dtypes), ("mapped twice", sorted(m.twice))) if keys]
        hint = ("every tensor must map; if another method made it, say which with --from" if not chosen
                else "every tensor must map; is --from right? without it the layout is detected from the keys")
        raise CheckpointError(f"{path} does not map onto an advcl {config['arch']} encoder ({read_as}); "
                              + "; ".join(parts), hint)


def _dropped_note(dropped: dict[str, str]) -> str:
    """``dropped a, b (why); c (why)``: the dropped keys grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for name, why in dropped.items():
        by_reason.setdefault(why, []).append(name)
    return "dropped " + "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())


def import_original(path: str | Path, out: str | Path, *, dataset: str = "cifar10", eps: float = 8 / 255,
                    source: str | None = None, notes: list[str] | None = None) -> Path:
    """Convert the published checkpoint at ``path`` into an encoder checkpoint at ``out``;
    ``source`` is ``--from`` (None: detected from the keys). What a person should know (what was
    dropped, a normalisation the file did not hold) is appended to ``notes``."""
    path = Path(path)
    notes = [] if notes is None else notes
    chosen = source_named(source) if source is not None else None
    state, extra = read_original(path)
    encoder, dropped, stray, network = split_networks(state)
    src = chosen or detect(list(encoder), network, path, dropped)

    m = _map_encoder(encoder, src, dropped, stray)
    how = "--from " + src.method if chosen else "detected from its keys"
    read_as = f"read as {src.layout} layout ({src.method}, {how})"
    config = _model_config(m, src, path, read_as)
    _check_complete(m, config, path, read_as, chosen is not None)
    check_finite({**{m.sources[k]: v for k, v in m.tensors.items()}, **{f"normalize.{k}": v for k, v in m.norm.items()}},
                 str(path))
    config.update(_normalisation(m.norm, src, path, notes))
    model = create_model(**config)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in m.tensors.items()}, strict=True)
    if dropped:
        notes.append(_dropped_note(dropped))
    meta_config = {"imported_from": path.name, **({"dropped": dropped} if dropped else {}), **extra}
    return save_model(out, model, kind="encoder", method=src.method, dataset=dataset, eps=eps,
                      config=meta_config, parent=sha256_file(path), rescue=True)
