"""What `advcl pretrain` and `advcl finetune` need from the methods to show their help and parse
their options, kept as JSON so that `--help` (or a mistyped option) does not import torch.

The methods' options and protocols are read from the method classes, which import torch (seconds
at start). The first command that needs them builds them and writes
``$XDG_CACHE_HOME/advcl/help-<key>.json`` (default ``~/.cache``); later commands read that file.
The key covers advcl's version, the Python version, the size and modification time of every
module of advcl and of each plugin method's module, and the plugins' names, targets and versions:
editing, installing or removing a method makes a new file. A cache that cannot be read or
written is rebuilt or skipped silently, and a new file replaces those of older keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

from ..version import __version__

PACKAGE = Path(__file__).resolve().parents[1]


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _module_file(module: str) -> Path | None:
    """Where a module's source is, without importing it (its top-level package is only found)."""
    top, *rest = module.split(".")
    try:
        spec = find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for base in spec.submodule_search_locations or []:
        for candidate in (Path(base, *rest).with_suffix(".py"), Path(base, *rest, "__init__.py")):
            if candidate.exists():
                return candidate
    return None


def cache_key() -> str:
    from importlib.metadata import entry_points

    from ..methods import ENTRY_POINT_GROUP

    parts = [__version__, sys.version]
    parts += sorted(_stamp(p) for p in PACKAGE.rglob("*.py"))
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        source = _module_file(ep.value.partition(":")[0])
        parts.append(f"{ep.name}={ep.value}@{dist.version if dist else '?'}:{_stamp(source) if source else '?'}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "advcl"


def cached(name: str, build: Callable[[], object]):
    """``build()`` (plain JSON data), from the cache when it holds this key's copy."""
    try:
        path = cache_dir() / f"help-{cache_key()}.json"
    except (OSError, RuntimeError):  # no home folder
        return build()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    if name in doc:
        return doc[name]
    doc[name] = value = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
        for old in path.parent.glob("help-*.json"):
            if old != path:
                old.unlink()
    except OSError:
        pass
    return value
