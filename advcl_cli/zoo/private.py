"""Nothing private leaves the machine: what a pushed checkpoint's metadata and card may carry.

A run's resolved configuration holds the paths it was given (``data_dir``, ``out``,
``pseudo_labels``, an ``imagefolder:PATH`` dataset), and those name the user's home, the user or
the machine. Before a push every string in the metadata, keys too, is made public: an absolute path becomes
its last part (``/home/alice/runs/slf`` -> ``slf``, ``imagefolder:/data/pets`` ->
``imagefolder:pets``), and a string that still names the home folder, the user (as a path part
or ``user@``) or this host becomes null. Relative paths stay as they are. Text the user wrote
for the card (recipe lines) is not rewritten behind their back: a line that names any of these,
or an absolute path, is refused so that they can write it relative.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

_ABSOLUTE = re.compile(r"^(~|/|[A-Za-z]:[\\/]|\\\\)")
_PREFIXED = re.compile(r"^([a-z][\w-]*):(.+)$")  # imagefolder:/data/pets
_LOCALHOST = {"localhost", "localhost.localdomain", "localhost6", "ip6-localhost"}


@dataclass(frozen=True)
class Identity:
    """What would identify this user and machine: the home folder, the user name, host names."""

    home: str | None
    user: str | None
    hosts: tuple[str, ...]


def identity() -> Identity:
    """This machine's, read now."""
    home = os.path.expanduser("~")
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        user = None
    names: set[str] = set()
    for name in (socket.gethostname(), socket.getfqdn()):
        names |= {name, name.split(".")[0]}
    hosts = tuple(sorted(n for n in names if len(n) >= 3 and n.lower() not in _LOCALHOST))
    return Identity(home if home not in ("", "/", "~") else None, user or None, hosts)


def is_absolute(path: str) -> bool:
    return bool(_ABSOLUTE.match(path))


def _last_part(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1].removeprefix("~")


def names_private(text: str, who: Identity) -> str | None:
    """What in ``text`` names the home folder, the user or the host (for the message), or None."""
    if who.home and who.home in text:
        return f"the home folder {who.home}"
    if who.user and re.search(rf"(^|[\\/]){re.escape(who.user)}([\\/]|$)|(?<![\w.-]){re.escape(who.user)}@", text):
        return f"the user name {who.user}"
    for host in who.hosts:
        if re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", text, re.IGNORECASE):
            return f"the host name {host}"
    return None


def public_string(value: str, who: Identity) -> str | None:
    """``value`` as it may be published: absolute paths cut to their last part, and None for
    anything that still names the user, the home folder or the host."""
    prefixed = _PREFIXED.match(value)
    if prefixed and is_absolute(prefixed.group(2)):
        rest = public_string(prefixed.group(2), who)
        return f"{prefixed.group(1)}:{rest}" if rest else None
    if is_absolute(value):
        value = _last_part(value)
        if not value:
            return None
    return None if names_private(value, who) else value


def public_value(value: Any, who: Identity, where: str, changed: list[str]) -> Any:
    """A JSON value with every string, keys too, made public (a key that stays private goes,
    with its value); the paths of those that changed go to ``changed``, named publicly."""
    if isinstance(value, str):
        public = public_string(value, who)
        if public != value:
            changed.append(where)
        return public
    if isinstance(value, dict):
        clean = {}
        for k, v in value.items():
            key = public_string(k, who)
            if key != k:
                changed.append(f"{where}.{key}" if key is not None else f"a key of {where}")
            if key is not None:
                clean[key] = public_value(v, who, f"{where}.{key}", changed)
        return clean
    if isinstance(value, list):
        return [public_value(v, who, f"{where}[{i}]", changed) for i, v in enumerate(value)]
    return value


def public_metadata(meta, who: Identity | None = None):
    """(the checkpoint ``Metadata`` as it may be published, the fields that had to change)."""
    who = who or identity()
    changed: list[str] = []
    doc = meta.model_dump(mode="json")
    clean = {key: public_value(doc[key], who, key, changed) for key in ("dataset", "config", "metrics", "model")}
    if clean["dataset"] is None:  # the dataset's name itself was private
        clean["dataset"] = "private"
    return meta.model_copy(update=clean), changed


def private_in_text(text: str, who: Identity | None = None) -> str | None:
    """What in a line the user wrote would be private (an absolute path, the user, the home
    folder, the host), or None."""
    who = who or identity()
    found = names_private(text, who)
    if found:
        return found
    for token in text.split():
        for part in token.strip("'\"").split("="):
            if is_absolute(part.strip("'\"")):
                return f"the absolute path {part}"
    return None
