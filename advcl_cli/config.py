"""Resolving settings from their layers on pydantic-settings; only ``cli/`` calls it.

Layers, lowest first: the model's defaults; the stored settings of a run being resumed; the
TOML file (``--config FILE``, else ``$ADVCL_CONFIG``, else ``./advcl.toml``): its top-level
keys, then the verb's table (``[pretrain]``), then, for pretraining, the method's table
(``[pretrain.acl]``); ``ADVCL_*`` environment variables; the flags. pydantic-settings layers
them (``settings_customise_sources``: the flags are its init kwargs, the environment its
``EnvSettingsSource`` with ``env_prefix="ADVCL_"``, each table and the stored settings a
source of their own). What it cannot do are the small additions below, each named:

- ``check_config``: every key of the file a setting of some verb or method, every table a verb
  (under ``[pretrain]`` a method), else an error naming the closest valid name;
- ``read_env``: a warning for an ``ADVCL_*`` variable that no setting uses;
- ``origin``: which layer gave a value, for the error that refuses it;
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

from pydantic import ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict, SettingsError

from .errors import TOO_DEEP, UsageError, require_file
from .methods import method_names, methods, settings_model
from .settings import VERBS, PretrainSettings, SettingsModel, env_name, flag_name

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


# --- what exists ----------------------------------------------------------------------------


def method_models() -> dict[str, type[BaseModel]]:
    """Each pretraining method's own settings model."""
    return {name: cls.Settings for name, cls in methods().items()}


def known_fields() -> set[str]:
    """Every setting name of every verb and method."""
    return {f for cls in [*VERBS.values(), *method_models().values()] for f in cls.model_fields}


def is_known(name: str) -> bool:
    """A setting of some verb or method; the methods are imported only when needed."""
    return any(name in cls.model_fields for cls in VERBS.values()) or name in known_fields()


def settings_table() -> str:
    """The README's table of every setting: its TOML key, flag, environment variable and users
    (a test checks that the README holds exactly this table)."""
    users: dict[str, list[str]] = {}
    flags = set()
    models = [(verb, cls) for verb, cls in VERBS.items()] + [(f"pretrain --method {m}", cls) for m, cls in method_models().items()]
    for user, cls in models:
        for name, f in cls.model_fields.items():
            users.setdefault(name, []).append(user)
            if (f.json_schema_extra or {}).get("flag", True):
                flags.add(name)
    rows = ["| TOML key | flag | environment | used by |", "|---|---|---|---|"]
    for name in sorted(users):
        flag = f"`{flag_name(name)}`" if name in flags else "-"
        rows.append(f"| `{name}` | {flag} | `{env_name(name)}` | {', '.join(users[name])} |")
    return "\n".join(rows)


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
    check_config(doc, path)
    return doc


def check_config(doc: dict[str, Any], path: Path) -> None:
    """Every key a setting of some verb or method, every table a verb or (under [pretrain]) a
    method; else a UsageError naming the key and the closest valid name."""
    methods = method_models() if isinstance(doc.get("pretrain"), dict) else {}

    def unknown(key: str, where: str, valid) -> UsageError:
        return UsageError(f"unknown key '{key}' in {where} of {path}", _did_you_mean(key, valid) or "see `advcl VERB --help` for the setting names")

    hub_verbs = ("pull", "push", "zoo")
    for key, value in doc.items():
        if not isinstance(value, dict):
            if not is_known(key):
                if key in VERBS:
                    raise UsageError(f"'{key}' in {path} is a table of settings, not a value", f"write [{key}] with its settings under it")
                raise unknown(key, "the top level", known_fields() | set(VERBS))
            continue
        if key in hub_verbs:
            raise UsageError(f"unknown table [{key}] in {path}", f"{', '.join(hub_verbs)} read their settings from [hub]")
        if key not in VERBS:
            raise UsageError(f"unknown table [{key}] in {path}", _did_you_mean(key, VERBS, "[{}]") or f"tables are: {', '.join(VERBS)}")
        fields = set(VERBS[key].model_fields)
        if key == "pretrain":
            fields |= {f for m in methods.values() for f in m.model_fields}
        for sub, sub_value in value.items():
            if isinstance(sub_value, dict):
                if sub in fields:
                    raise UsageError(f"'{sub}' in [{key}] of {path} takes a value, not a table", f"write {sub} = VALUE")
                if key != "pretrain" or sub not in methods:
                    valid = methods if key == "pretrain" else ()
                    raise UsageError(f"unknown table [{key}.{sub}] in {path}",
                                     _did_you_mean(sub, valid, f"[{key}.{{}}]") or
                                     (f"method tables are: {', '.join(methods)}" if key == "pretrain" else f"[{key}] has no sub-tables"))
                for name in sub_value:
                    if name not in methods[sub].model_fields:
                        raise unknown(name, f"[{key}.{sub}]", methods[sub].model_fields)
            elif sub not in fields:
                raise unknown(sub, f"[{key}]", fields)


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


class Layer(InitSettingsSource):
    """One named layer of values: a table of the TOML file, or a resumed run's stored settings."""

    def __init__(self, settings_cls: type[BaseSettings], label: str, values: dict[str, Any]):
        self.label = label
        super().__init__(settings_cls, {k: v for k, v in values.items() if k in settings_cls.model_fields})


_LAYERS: ContextVar[list[tuple[str, dict]]] = ContextVar("layers")


@cache
def layered(cls: type[SettingsModel]) -> type[BaseSettings]:
    """``cls`` as a pydantic-settings model: flags (init kwargs) > ``ADVCL_*`` > the layers of
    ``_LAYERS``, highest last in that list."""

    class Layered(BaseSettings, cls):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, enable_decoding=False, extra="forbid")

        @classmethod
        def settings_customise_sources(cls_, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            layers = [Layer(settings_cls, label, values) for label, values in reversed(_LAYERS.get())]
            return (init_settings, env_settings, *layers)

    Layered.__name__ = cls.__name__
    return Layered


def origin(name: str, layers: list[tuple[str, dict]], flags: dict[str, Any]) -> tuple[str | None, Any]:
    """Which layer gave setting ``name``, and its value there (None, None: the default)."""
    env = {k.lower(): v for k, v in os.environ.items()}.get(env_name(name).lower())
    named = [(label, values[name]) for label, values in layers if name in values]
    if name in flags:
        return "flags", flags[name]
    if env is not None:
        return "environment", env
    return named[-1] if named else (None, None)


def resolve(cls: type[SettingsModel], flags: dict[str, Any], *, config_file: str | Path | None = None,
            base: dict[str, Any] | None = None, may_change: set[str] | None = None,
            warn: Warn | None = None) -> SettingsModel:
    """``cls`` filled from every layer. ``flags`` are the command line's values (None: not
    given); ``base`` a resumed run's stored settings: every other layer sits above them, and
    may change only those in ``may_change`` (default: ``cls.resume_may_change()``, see
    ``check_unchanged``). For ``PretrainSettings``
    the result is the chosen method's model (``methods.settings_model``)."""
    flags = {k: v for k, v in flags.items() if v is not None}
    path = config_path(config_file)
    doc = read_config(path)
    if warn is not None:
        read_env(warn)
    section = doc.get(cls.section, {}) if cls.section else {}
    layers: list[tuple[str, dict]] = [
        (STORED, dict(base or {})),
        (f"{path} (top level)", {k: v for k, v in doc.items() if not isinstance(v, dict)}),
        (f"{path} [{cls.section}]", {k: v for k, v in section.items() if not isinstance(v, dict)}),
    ]
    if issubclass(cls, PretrainSettings):
        method = origin("method", layers, flags)[1] or PretrainSettings.model_fields["method"].default
        method = str(method).strip().lower()
        cls = settings_model(method)  # an unknown method is a UsageError listing the known ones
        table = section.get(method, {})
        layers.append((f"{path} [{PretrainSettings.section}.{method}]", table if isinstance(table, dict) else {}))
        _check_method_flags(flags, cls, method)
    layers = [(label, {k: v for k, v in values.items() if k in cls.model_fields}) for label, values in layers]
    unknown = sorted(set(flags) - set(cls.model_fields))
    if unknown:  # a caller's bug, or a flag of another verb
        raise UsageError(f"{flag_name(unknown[0])} is not an option of this command")
    token = _LAYERS.set(layers)
    try:
        done = layered(cls)(**flags)
    except ValidationError as e:
        raise _value_error(e, layers, flags) from None
    except SettingsError as e:  # pragma: no cover - decoding is off; kept as a one-line error
        raise UsageError(f"bad setting: {e}") from None
    finally:
        _LAYERS.reset(token)
    settings = cls.model_construct(_fields_set=done.model_fields_set, **dict(done))
    if base is not None:
        check_unchanged(settings, base, layers, flags, cls.resume_may_change() if may_change is None else may_change)
    return settings


def _where(name: str, source: str | None) -> str:
    return {"flags": flag_name(name), "environment": env_name(name)}.get(source, source or "the defaults")


def check_unchanged(settings: SettingsModel, stored: dict[str, Any], layers, flags, may_change: set[str]) -> None:
    """A resumed run trains what it started to: a setting outside ``may_change`` that a layer
    above the stored settings changes is refused, naming that layer (flag, variable, file)."""
    now = settings.to_config()
    # a changed method is the engine's to name (``check_resume_config``): its settings differ anyway
    differ = sorted(k for k in stored if k in now and k not in may_change | {"method"} and now[k] != stored[k])
    if differ:
        parts = [f"{k.replace('_', '-')} is {now[k]!r} from {_where(k, origin(k, layers, flags)[0])} but {stored[k]!r} in the run"
                 for k in differ[:3]]
        raise UsageError("cannot resume with different settings: " + "; ".join(parts),
                         "resume without them (the run's own settings are kept), or start over with --force")


def _check_method_flags(flags: dict[str, Any], cls: type[SettingsModel], method: str) -> None:
    """A flag that belongs to other methods only is refused, naming them."""
    for key in flags:
        if key in cls.model_fields:
            continue
        owners = [m for m, model in method_models().items() if key in model.model_fields]
        if owners:
            raise UsageError(
                f"{flag_name(key)} is an option of {', '.join(owners)}, not of --method {method}",
                f"drop it, or choose one of those methods (methods: {', '.join(method_names())})",
            )


def _value_error(e: ValidationError, layers, flags) -> UsageError:
    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    msg = err["msg"].removeprefix("Value error, ")
    source, value = origin(name, layers, flags)
    where = env_name(name) if source == "environment" else flag_name(name)
    from_ = "" if source in (None, "flags", "environment") else f" (from {source})"
    given = f" {value!r}" if value is not None and not isinstance(value, (list, dict)) else ""
    return UsageError(f"bad value{given} for {where}{from_}: {msg}")
