"""What pydantic-settings cannot do for advcl's settings: the TOML file and the environment.

``settings.layering`` layers the settings on pydantic-settings; it asks this module for

- ``read_config``: the file (``--config FILE``, else ``$ADVCL_CONFIG``, else ``./advcl.toml``)
  read once (a pipe reads once), one-line UTF-8/TOML/nesting errors, and its shape checked by
  validating it against ``settings.document_model`` (``extra="forbid"``);
- ``_shape_error``: an unknown key or table named with the closest valid name;
- ``read_env``: a warning for an ``ADVCL_*`` variable that no setting uses.

pydantic-settings' ``TomlConfigSettingsSource`` is not used: it reads the file once per table (a
pipe reads once) and would pass a table such as ``[attack]`` as the value of the key ``attack``.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from .errors import TOO_DEEP, UsageError, require_file
from .settings import VERBS, document_model, env_name, is_known, known_fields, verb_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "ADVCL_"
# variables read outside the settings models (the last: a test hook, engine.stop)
OTHER_ENV = {"ADVCL_CONFIG", "ADVCL_DEBUG", "ADVCL_DIST_TIMEOUT", "ADVCL_FAULT_AT_STEP"}
Warn = Callable[[str], None]


def _did_you_mean(word: str, choices, fmt: str = "'{}'") -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {fmt.format(close[0])}?" if close else None


# --- the TOML file --------------------------------------------------------------------------


def config_path(explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else ``$ADVCL_CONFIG``, else ``./advcl.toml`` if it exists."""
    explicit = explicit or os.environ.get("ADVCL_CONFIG")
    if explicit:
        return require_file(explicit, "config file", "pass an existing --config FILE or unset ADVCL_CONFIG", pipe=True)
    default = Path("advcl.toml")
    return default if default.is_file() else None


_PIPED: dict[tuple[int, int], bytes] = {}  # a pipe reads once: its text, for a resumed run's second look


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; a pipe's (``--config <(...)``, ``/dev/stdin``) read once per process."""
    st = path.stat()
    if not stat.S_ISFIFO(st.st_mode):
        return path.read_bytes()
    key = (st.st_dev, st.st_ino)
    if key not in _PIPED:
        _PIPED[key] = path.read_bytes()
    return _PIPED[key]


def read_config(path: Path | None) -> dict[str, Any]:
    """The checked document of the TOML file (empty without one)."""
    if path is None:
        return {}
    try:
        doc = tomllib.loads(_read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text", "save it as UTF-8 (TOML files must be)") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise UsageError(f"config file {path} is not valid TOML: {TOO_DEEP}") from None
    # the methods (and torch) are imported only for a [pretrain] table or a key no verb has
    with_methods = isinstance(doc.get("pretrain"), dict) or not set(doc) <= verb_fields() | set(VERBS)
    try:
        document_model(with_methods).model_validate(doc)
    except ValidationError as e:
        raise _shape_error(e.errors()[0], path, document_model(with_methods)) from None
    return doc


def _shape_error(err: dict, path: Path, model: type[BaseModel]) -> UsageError:
    """A validation error of the file against ``document_model`` as one line naming the key or
    table, with the closest valid name."""
    *within, key = [str(p) for p in err["loc"]]
    for name in within:
        model = model.model_fields[name].annotation
    tables = [k for k, f in model.model_fields.items() if f.annotation is not Any]
    keys = [k for k in model.model_fields if k not in tables]
    if err["type"] == "model_type" and not within:
        return UsageError(f"'{key}' in {path} is a table of settings, not a value", f"write [{key}] with its settings under it")
    if err["type"] == "value_error" and within:
        return UsageError(f"'{key}' in [{'.'.join(within)}] of {path} takes a value, not a table", f"write {key} = VALUE")
    if isinstance(err["input"], dict) and len(within) < 2:
        if key in ("pull", "push", "zoo"):
            return UsageError(f"unknown table [{key}] in {path}", "pull, push, zoo read their settings from [hub]")
        others = (f"{'method tables' if within else 'tables'} are: {', '.join(tables)}" if tables
                  else f"[{within[0]}] has no sub-tables")
        return UsageError(f"unknown table [{'.'.join([*within, key])}] in {path}",
                          _did_you_mean(key, tables, f"[{'.'.join([*within, '{}'])}]") or others)
    where = f"[{'.'.join(within)}] of {path}" if within else f"the top level of {path}"
    return UsageError(f"unknown key '{key}' in {where}",
                      _did_you_mean(key, keys if within else model.model_fields) or "see `advcl VERB --help` for the setting names")


# --- the environment ------------------------------------------------------------------------

_warned: set[str] = set()


def read_env(warn: Warn) -> None:
    """One warning for each ``ADVCL_*`` variable that no setting uses (pydantic-settings reads
    the others and ignores these)."""
    for var in os.environ:
        name = var[len(ENV_PREFIX):].lower()
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV or var in _warned or is_known(name):
            continue
        _warned.add(var)
        close = difflib.get_close_matches(name, list(known_fields()), n=1, cutoff=0.6)
        warn(f"environment variable {var} is not an advcl setting; it is ignored"
             + (f" (did you mean {env_name(close[0])}?)" if close else ""))
