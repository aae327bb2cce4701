"""Checkpoints: one ``.safetensors`` file per model with a JSON metadata document.

The metadata (safetensors' string map, key ``advcl``) holds ``format_version``, ``kind``
(encoder | classifier), ``arch``, ``method``, ``dataset``, ``num_classes``, ``eps``, ``config``
(the resolved run configuration), ``metrics``, ``parent`` (sha256 of the checkpoint this one
was made from) and ``model`` (the ModelConfig that rebuilds the network). Every write goes to a
temporary file that is renamed into place, so a crash never leaves a half-written file. Resume
state (optimizer, schedule, RNG) is a second safetensors file written by ``save_state``.
Nothing here unpickles.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from .errors import TOO_DEEP, CheckpointError, UsageError, os_error, require_file
from .models import AdvclNet, ModelConfig

FORMAT_VERSION = 1
META_KEY = "advcl"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    kind: Literal["encoder", "classifier"]
    arch: str
    method: str
    dataset: str
    num_classes: int | None = None
    eps: float | None = None
    config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    parent: str | None = None
    model: dict[str, Any]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only read
    it by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | Path, flag: str | None = None) -> Path:
    """A UsageError unless ``atomic_write(path)`` can work: ``path`` is not a folder, and its
    folder (or the nearest existing one above, under which the rest is created) is a folder
    where a file can be created (tried: permission bits say nothing to root, and a read-only
    file system is read-only for everyone), and nothing but a regular file is there (a device,
    a pipe or a link is never replaced, not even with --force). ``flag`` names the option in
    the message."""
    path = Path(path)
    what = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UsageError(f"cannot write {what}: it is a folder", "name a file")
    check_regular(path, what)
    check_folder_writable(path.parent, what)
    return path


def check_regular(path: Path, what: str | None = None) -> None:
    """A UsageError when ``path`` exists and is not a regular file: advcl replaces only files."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there, or a part of the path is no folder (the folder check says so)
        return
    if not stat.S_ISREG(mode):
        kind = "a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or pipe"
        raise UsageError(f"cannot write {what or path}: it is {kind}, not a regular file",
                         "advcl replaces only regular files, even with --force: name another path")


def check_folder_writable(folder: str | Path, what: str | None = None) -> Path:
    """A UsageError (or a DiskError) unless files can be created in ``folder``, or, when it does
    not exist yet, in the nearest existing folder above it (where it will be created)."""
    folder = Path(folder)
    what = what or str(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"cannot write {what}: {probe_dir} is not a writable folder (it is a file)",
                         "a part of the path is a file, not a folder: choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".advcl-probe-", dir=probe_dir)
    except OSError as e:
        err = os_error(e, what)
        err.message = f"cannot write {what}: {probe_dir} is not a writable folder ({e.strerror or e})"
        raise err from None
    os.close(fd)
    os.unlink(probe)
    return folder


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to the file descriptor ``fd`` with ``os.write``: a failure (a full disk)
    is an OSError, never a silent short write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def refuse_empty(path: Path) -> None:
    """A CheckpointError for a file of 0 bytes (a copy or download that never happened)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)", "copy or download it again")


def _write_into(folder: Path, name: str, write: Callable[[Path], None] | bytes) -> Path:
    """Write to a new temporary file in ``folder``, flushed to disk; return its path (removed
    again if anything fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if isinstance(write, (bytes, bytearray, memoryview)):
            _write_bytes(Path(tmp), write)
        else:
            write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # after write: mkstemp gives 0600, and writers may recreate the file
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(path: str | Path, write: Callable[[Path], None] | bytes, *, rescue: bool = False) -> Path:
    """Write ``path`` atomically: the bytes ``write`` (or what ``write(tmp)`` puts in a temporary
    file beside ``path``) are flushed to disk and renamed into place (mode 0666 less the umask,
    as ``open`` would give). Nothing half-written stays and an old file is left intact.

    An OSError is an error naming ``path`` and its cause (``errors.os_error``: exit 2 for a bad
    path, 1 for a full disk). With ``rescue`` (a result that took long to compute) the file is
    then written to the temporary folder instead, and the error names where it went."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(_write_into(path.parent, path.name, write), path)
    except OSError as e:
        err = os_error(e, path)
        if rescue:
            err.message += "; " + _rescue(path, write)
        raise err from None
    return path


def _rescue(path: Path, write: Callable[[Path], None] | bytes) -> str:
    """Save what could not be written at ``path`` in the temporary folder; say where."""
    folder = Path(tempfile.gettempdir())
    try:
        tmp = _write_into(folder, path.name, write)
        fd, target = tempfile.mkstemp(prefix="advcl-rescued-", suffix=f"-{path.name}", dir=folder)
        os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        return f"it could not be saved elsewhere either ({folder}: {e.strerror or e})"
    return f"saved it as {target} instead"


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, for ``atomic_write``: every file advcl writes goes through
    its one ``os.write`` path, where a failed write is an OSError naming the file."""
    return safetensors_save(tensors, metadata=metadata)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, without DDP/compile wrapper prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
            key = key.replace("." + prefix, ".")
        out[key] = value.detach().to("cpu").contiguous()
    return out


def unwrap(model: torch.nn.Module) -> AdvclNet:
    """The AdvclNet inside DDP / torch.compile wrappers."""
    while not isinstance(model, AdvclNet):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not an AdvclNet: {type(model).__name__}")
        model = inner
    return model


def save_model(
    path: str | Path,
    model: torch.nn.Module,
    *,
    kind: Literal["encoder", "classifier"],
    method: str,
    dataset: str,
    eps: float | None = None,
    config: dict | None = None,
    metrics: dict | None = None,
    parent: str | None = None,
    rescue: bool = False,
) -> Path:
    """Write ``model`` and its metadata atomically; return the path. ``rescue``: see
    ``atomic_write``."""
    net = unwrap(model)
    meta = Metadata(
        kind=kind,
        arch=net.config.arch,
        method=method,
        dataset=dataset,
        num_classes=net.config.num_classes,
        eps=eps,
        config=config or {},
        metrics=metrics or {},
        parent=parent,
        model=net.config.to_dict(),
    )
    return _write(path, clean_state_dict(net.state_dict()), meta, rescue=rescue)


def _write(path: str | Path, tensors: dict[str, torch.Tensor], meta: Metadata, *, rescue: bool = False) -> Path:
    doc = {META_KEY: meta.model_dump_json()}
    return atomic_write(path, safetensors_bytes(tensors, doc), rescue=rescue)


def with_metadata(src: str | Path, dst: str | Path, meta: Metadata) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with the same tensors and ``meta`` as its metadata."""
    from safetensors.torch import load_file

    return _write(dst, load_file(str(src)), meta)


@dataclass
class Checkpoint:
    path: Path
    meta: Metadata
    tensors: dict[str, torch.Tensor]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta.model)

    @functools.cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def build(self, device: str | torch.device = "cpu") -> AdvclNet:
        """The network with these weights, in eval mode."""
        net = AdvclNet(self.model_config)
        net.load_state_dict(self.tensors, strict=True)
        return net.to(device).eval()


def parse_json(raw: str | bytes) -> Any:
    """``json.loads``; a document nested too deeply for Python's parser (a RecursionError) is a
    ValueError too, like any other that does not parse."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None


def why_not_json(e: ValueError) -> str:
    """': nested too deeply' for ``parse_json``'s error of a too deep document, else nothing."""
    return f": {TOO_DEEP}" if str(e) == TOO_DEEP else ""


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse the safetensors header by hand so that bad files get precise messages."""
    try:
        refuse_empty(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path} is not a safetensors file (bad header)")
            raw = f.read(n)
    except OSError as e:
        raise os_error(e, path, "read") from None
    try:
        header = parse_json(raw)
    except ValueError as e:
        raise CheckpointError(f"{path} is not a safetensors file (bad header{why_not_json(e)})") from None
    try:  # a string map of metadata; per tensor a shape of integers and data offsets
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise TypeError("__metadata__ is not a map of strings")
        entries = [v for k, v in header.items() if k != "__metadata__"]
        end = max((int(v["data_offsets"][1]) for v in entries), default=0)
        if not all(isinstance(d, int) for v in entries for d in v["shape"]):
            raise TypeError("a shape is not a list of integers")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):  # also: a header that is not a dict
        raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated ({size} bytes, {8 + n + end} expected)",
            "download or copy it again",
        )
    return header, size


def _checked_header(path: str | Path) -> tuple[Path, dict]:
    path = require_file(path, "checkpoint file", error=CheckpointError)
    return path, _read_header(path)[0]


def read_metadata(path: str | Path) -> Metadata:
    """Only the metadata: cheap, reads the header."""
    return _metadata(*_checked_header(path))


def _metadata(path: Path, header: dict) -> Metadata:
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path} is a safetensors file but not an advcl checkpoint (no '{META_KEY}' metadata)"
        )
    try:
        doc = parse_json(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: the advcl metadata is not valid JSON{why_not_json(e)}") from None
    if not isinstance(doc, dict) or "format_version" not in doc:
        raise CheckpointError(f"{path}: the advcl metadata is damaged (not an object with a format_version)",
                              "use the original file, or write it again with the command that made it")
    version = doc["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown checkpoint format_version {version!r} (this advcl reads {FORMAT_VERSION})",
            "upgrade advcl",
        )
    try:
        return Metadata.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise CheckpointError(f"{path}: bad metadata field '{where}': {err['msg']}") from None


def expected_tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of ``config``'s network on the meta device: names, shapes, dtypes, no data."""
    with torch.device("meta"):
        return AdvclNet(config).state_dict()


# the types a weight may be stored in (safetensors' names); a BN's step counter is an int64
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def wrong_dtypes(have: dict[str, str | torch.dtype], want: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of ``have`` (name -> dtype, or safetensors' name of it) whose type cannot hold
    what ``want`` holds: a weight as int8, bool, float8 or complex, a counter as a float."""
    def weight(d) -> bool:
        return d in WEIGHT_DTYPES or d in WEIGHT_DTYPES.values()

    return sorted(f"{k} {str(d).removeprefix('torch.')}" for k, d in have.items()
                  if k in want and weight(d) != want[k].is_floating_point())


def not_a_classifier(what: str, path: str | Path | None = None) -> CheckpointError:
    """The error for a model without a classifier head (an encoder): say how to make one."""
    return CheckpointError(f"{what}; finetune it first", f"advcl finetune {path or 'CKPT'} --scheme slf")


def check_checkpoint(path: str | Path, kind: str | None = None) -> Metadata:
    """Validate a checkpoint from its header alone, without reading the weights: metadata,
    kind (when given), and tensor names and shapes against its arch."""
    path, header = _checked_header(path)
    meta = _metadata(path, header)
    if kind == "classifier" and meta.kind != kind:
        raise not_a_classifier(f"{path} is an {meta.kind} checkpoint", path)
    if kind is not None and meta.kind != kind:
        raise CheckpointError(f"{path} is a {meta.kind} checkpoint, an {kind} is needed")
    try:
        config = ModelConfig.from_dict(meta.model)
    except CheckpointError as e:  # an unknown arch, a bad field: name the file
        raise CheckpointError(f"{path}: {e.message}", e.hint) from None
    have = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    want = expected_tensors(config)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if have[k] != tuple(want[k].shape))
    dtypes = wrong_dtypes({k: str(v.get("dtype")) for k, v in header.items() if k != "__metadata__"}, want)
    if missing or unexpected or wrong or dtypes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong), ("wrong type", dtypes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise CheckpointError(f"{path} does not match architecture '{config.arch}' ({'; '.join(parts)})",
                              "weights must be stored as F16, BF16, F32 or F64" if dtypes else None)
    _read_tensors(path, load=False)
    return meta


def _read_tensors(path: Path, load: bool = True) -> dict[str, torch.Tensor]:
    """All tensors; with ``load=False`` none, after safetensors' own checks of the header
    (dtypes, offsets), which read no tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()} if load else {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} could not be read: {e}") from None


def nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """The first floating-point tensor holding NaN or inf: (name, bad values, values); None when
    every value is finite."""
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad, t.numel()
    return None


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """A CheckpointError naming the first tensor with NaN or inf values: such a model computes
    nothing meaningful (a diverged run), so no score of it should be reported."""
    found = nonfinite(tensors)
    if found is not None:
        name, bad, total = found
        raise CheckpointError(
            f"{what} holds NaN or inf weights (tensor '{name}': {bad} of {total} values)",
            "the run that wrote it diverged; use an earlier checkpoint (its metadata still reads with read_metadata)",
        )


def load_checkpoint(path: str | Path, kind: str | None = None, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Validate a checkpoint (``check_checkpoint``), then read its weights, which must be finite
    (``check_finite``) unless ``allow_nonfinite`` (to inspect a broken file from Python)."""
    path = Path(path)
    meta = check_checkpoint(path, kind)
    tensors = _read_tensors(path)
    if not allow_nonfinite:
        check_finite(tensors, str(path))
    return Checkpoint(path=path, meta=meta, tensors=tensors)


# --- resume state: nested dicts/lists of tensors and JSON values --------------------------


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors) for v in obj]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict) -> Path:
    """Save nested resume state (optimizer state dicts, RNG states, counters) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _flatten(state, tensors)
    if not tensors:  # safetensors needs at least one tensor to be a useful file
        tensors["t_empty"] = torch.zeros(1)
    meta = {"advcl_state": json.dumps(doc)}
    return atomic_write(path, safetensors_bytes(tensors, meta))


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no resume state at {path}")
    header, _ = _read_header(path)
    raw = (header.get("__metadata__") or {}).get("advcl_state")
    if raw is None:
        raise CheckpointError(f"{path} is not an advcl resume state file")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten(parse_json(raw), tensors)
