"""Resolving settings from their layers on pydantic-settings; only ``cli/`` calls it.

Layers, lowest first: the defaults; a resumed run's stored settings; the TOML file (``--config
FILE``, else ``$ADVCL_CONFIG``, else ``./advcl.toml``): its top level, the verb's table
(``[pretrain]``), for pretraining the method's (``[pretrain.acl]``); ``ADVCL_*``; the flags.
pydantic-settings layers them: its ``EnvSettingsSource`` (``env_prefix="ADVCL_"``) and a
``Layer`` source for the flags, each table and the stored settings, in the order
``settings_customise_sources`` gives; the file's shape is the validation of it against
``settings.document_model`` (``extra="forbid"``). Its ``TomlConfigSettingsSource`` is not used:
it reads the file once per table (a pipe reads once) and would pass a table such as ``[attack]``
as the value of the key ``attack``. What pydantic-settings cannot do are these additions:

- ``read_config``: one read of the file (a pipe reads once), one-line UTF-8/TOML/nesting errors;
- ``_shape_error``: an unknown key or table named with the closest valid name;
- ``read_env``: a warning for an ``ADVCL_*`` variable that no setting uses;
- ``origin``: which source gave a value, for the error that refuses it;
- ``check_unchanged``: a resumed run refuses a changed setting that is not ``resume_may_change``.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import TOO_DEEP, UsageError, require_file
from .methods import method_names, settings_model
from .settings import (VERBS, MethodSettings, PretrainSettings, SettingsModel, document_model, env_name, flag_name,
                       is_known, known_fields, method_models, verb_fields)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "ADVCL_"
# variables read outside the settings models (the last: a test hook, engine.stop)
OTHER_ENV = {"ADVCL_CONFIG", "ADVCL_DEBUG", "ADVCL_DIST_TIMEOUT", "ADVCL_FAULT_AT_STEP"}
STORED = "the stored settings of the run"
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


# --- resolution -----------------------------------------------------------------------------


class Layer(PydanticBaseSettingsSource):
    """One named layer of values: the flags, a table of the TOML file, or a resumed run's stored settings."""

    def __init__(self, settings_cls: type[BaseSettings], label: str, values: dict[str, Any]):
        super().__init__(settings_cls)
        self.label = label
        self.values = {k: v for k, v in values.items() if k in settings_cls.model_fields and not isinstance(v, dict)}

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ answers for every field
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class Env(EnvSettingsSource):
    """pydantic-settings' ``ADVCL_*`` source, its answer kept for the same variables (it walks
    every field's type on each call: most of a resolve's time)."""

    label = "environment"
    _seen: dict[tuple, dict[str, Any]] = {}

    def __call__(self) -> dict[str, Any]:
        key = (self.settings_cls, tuple(sorted((k, v) for k, v in self.env_vars.items() if k.startswith("advcl_"))))
        if key not in self._seen:
            self._seen[key] = super().__call__()
        return dict(self._seen[key])


_SOURCES: ContextVar[list[PydanticBaseSettingsSource]] = ContextVar("sources")


@cache
def layered(cls: type[SettingsModel]) -> type[BaseSettings]:
    """``cls`` as a pydantic-settings model whose sources are those ``_SOURCES`` holds, highest first."""

    class Layered(BaseSettings, cls):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, enable_decoding=False, extra="forbid")

        @classmethod
        def settings_customise_sources(cls_, *_, **__):
            return tuple(_SOURCES.get())

    Layered.__name__ = cls.__name__
    return Layered


def _build(cls: type[SettingsModel], flags: dict[str, Any], layers: list[tuple[str, dict]]) -> tuple[BaseSettings, list]:
    """``cls`` filled from ``flags`` > the environment > ``layers`` (highest last), and those sources."""
    model = layered(cls)
    sources = [Layer(model, "flags", flags), Env(model), *(Layer(model, label, values) for label, values in reversed(layers))]
    token = _SOURCES.set(sources)
    try:
        return model(), sources
    except ValidationError as e:
        raise _value_error(e, sources) from None
    finally:
        _SOURCES.reset(token)


def origin(name: str, sources: list) -> tuple[str | None, Any]:
    """Which source gave setting ``name``, and its value there (None, None: the default)."""
    for source in sources:
        values = source()
        if name in values:
            return source.label, values[name]
    return None, None


def resolve(cls: type[SettingsModel], flags: dict[str, Any], *, config_file: str | Path | None = None,
            base: dict[str, Any] | None = None, may_change: set[str] | None = None,
            warn: Warn | None = None) -> SettingsModel:
    """``cls`` filled from every layer; ``flags``: the command line's values (None: not given);
    ``base``: a resumed run's stored settings, which the other layers may change only in
    ``may_change`` (default ``cls.resume_may_change()``). For ``PretrainSettings``, the chosen
    method's model (``methods.settings_model``)."""
    flags = {k: v for k, v in flags.items() if v is not None}
    path = config_path(config_file)
    doc = read_config(path)
    if warn is not None:
        read_env(warn)
    section = doc.get(cls.section, {}) if cls.section else {}  # a Layer leaves out the tables in it ([attack])
    layers = [(STORED, base or {}), (f"{path} (top level)", doc), (f"{path} [{cls.section}]", section)]
    method = None
    if issubclass(cls, PretrainSettings):
        method = _build(MethodSettings, {k: v for k, v in flags.items() if k == "method"}, layers)[0].method
        cls = settings_model(method)  # an unknown method is a UsageError listing the known ones
        layers.append((f"{path} [{PretrainSettings.section}.{method}]", section.get(method, {})))
    for key in sorted(set(flags) - set(cls.model_fields)):  # another method's flag, another verb's, or a caller's bug
        if owners := [m for m, model in method_models().items() if key in model.model_fields] if method else []:
            raise UsageError(f"{flag_name(key)} is an option of {', '.join(owners)}, not of --method {method}",
                             f"drop it, or choose one of those methods (methods: {', '.join(method_names())})")
        raise UsageError(f"{flag_name(key)} is not an option of this command")
    done, sources = _build(cls, flags, layers)
    settings = cls.model_construct(_fields_set=done.model_fields_set, **dict(done))
    if base is not None:
        check_unchanged(settings, base, sources, cls.resume_may_change() if may_change is None else may_change)
    return settings


def _where(name: str, source: str | None) -> str:
    return {"flags": flag_name(name), "environment": env_name(name)}.get(source, source or "the defaults")


def check_unchanged(settings: SettingsModel, stored: dict[str, Any], sources: list, may_change: set[str]) -> None:
    """The engine's resume check (``check_resume_config``) at resolve time, on the settings the
    run stored, naming the layer each change comes from (flag, variable, file)."""
    from .engine.run import check_resume_config

    now = settings.to_config()
    keys = set(stored) & set(now) - {"method"}  # a changed method is the engine's to name: its settings differ anyway
    check_resume_config({k: stored[k] for k in keys}, {k: now[k] for k in keys}, may_change,
                        lambda k: "from " + _where(k, origin(k, sources)[0]))


def _value_error(e: ValidationError, sources: list) -> UsageError:
    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    msg = err["msg"].removeprefix("Value error, ")
    source, value = origin(name, sources)
    where = env_name(name) if source == "environment" else flag_name(name)
    from_ = "" if source in (None, "flags", "environment") else f" (from {source})"
    given = f" {value!r}" if value is not None and not isinstance(value, (list, dict)) else ""
    return UsageError(f"bad value{given} for {where}{from_}: {msg}")
