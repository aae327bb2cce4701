"""Resolving settings from their layers, and checking the layers for names nothing uses.

Layers, lowest first: the model's defaults; the stored settings of a run being resumed; the
TOML file (``--config FILE``, else ``$ADVCL_CONFIG``, else ``./advcl.toml``): its top-level
keys, then the verb's table (``[pretrain]``), then, for pretraining, the method's table
(``[pretrain.acl]``); ``ADVCL_*`` environment variables; the flags::

    data_dir = "/scratch/data"
    [pretrain]
    epochs = 200
    [pretrain.acl]
    lr = 2.0

Every key of the file must be a setting of some verb or method, every table a verb (and under
``[pretrain]`` a method): anything else is an error naming the key and the closest valid one,
so a typo never trains silently with the default. An ``ADVCL_*`` variable that no setting
uses gets a warning. A bad value names the flag and where the value came from. A resumed run
keeps every stored setting that no layer gives; a layer may change only the settings that do
not change what is computed (``may_change``): any other value that differs from the run's is
refused the same way, naming the layer it came from.
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
from .methods import get_method, method_names, settings_model
from .settings import VERBS, PretrainSettings, SettingsModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "ADVCL_"
# variables read outside the settings models
OTHER_ENV = {"ADVCL_CONFIG", "ADVCL_DEBUG", "ADVCL_DIST_TIMEOUT", "ADVCL_FAULT_AT_STEP"}  # the last: a test hook (engine.stop)
Warn = Callable[[str], None]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _closest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(word: str, choices, fmt: str = "'{}'") -> str | None:
    close = _closest(word, choices)
    return f"did you mean {fmt.format(close)}?" if close else None


# --- what exists ----------------------------------------------------------------------------


def method_models() -> dict[str, type[BaseModel]]:
    """Each pretraining method's own settings model."""
    return {name: get_method(name).Settings for name in method_names()}


def verb_fields() -> set[str]:
    """Every setting name of every verb (without the methods': cheap, imports no method)."""
    return {f for cls in VERBS.values() for f in cls.model_fields}


def known_fields() -> set[str]:
    """Every setting name of every verb and method."""
    return verb_fields() | {f for m in method_models().values() for f in m.model_fields}


def is_known(name: str) -> bool:
    """A setting of some verb or method; the methods are imported only when needed."""
    return name in verb_fields() or name in known_fields()


def settings_table() -> str:
    """The README's table of every setting: its TOML key, flag, environment variable and users
    (a test checks that the README holds exactly this table)."""
    users: dict[str, list[str]] = {}
    for verb, cls in VERBS.items():
        for name in cls.model_fields:
            users.setdefault(name, []).append(verb)
    for method, model in method_models().items():
        for name in model.model_fields:
            users.setdefault(name, []).append(f"pretrain --method {method}")
    flags = {name for cls in [*VERBS.values(), *method_models().values()] for name, f in cls.model_fields.items()
             if (f.json_schema_extra or {}).get("flag", True)}
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
            if key in VERBS and not is_known(key):
                raise UsageError(f"'{key}' in {path} is a table of settings, not a value", f"write [{key}] with its settings under it")
            if not is_known(key):
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


def read_env(warn: Warn | None = None) -> dict[str, str]:
    """``ADVCL_*`` variables by setting name; unknown ones get one warning each."""
    values = {}
    for var, value in os.environ.items():
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV:
            continue
        name = var[len(ENV_PREFIX):].lower()
        if is_known(name):
            values[name] = value
        elif warn is not None and var not in _warned:
            _warned.add(var)
            close = _closest(name, known_fields())
            warn(f"environment variable {var} is not an advcl setting; it is ignored"
                 + (f" (did you mean {env_name(close)}?)" if close else ""))
    return values


# --- resolution -----------------------------------------------------------------------------


def resolve(cls: type[SettingsModel], flags: dict[str, Any], *, config_file: str | Path | None = None,
            base: dict[str, Any] | None = None, may_change: set[str] = frozenset(),
            warn: Warn | None = None) -> SettingsModel:
    """``cls`` filled from every layer. ``flags`` are the command line's values (None: not
    given); ``base`` a resumed run's stored settings: every other layer sits above them, and
    may change only those in ``may_change`` (``check_unchanged``). For ``PretrainSettings``
    the result is the chosen method's model (``methods.settings_model``)."""
    flags = {k: v for k, v in flags.items() if v is not None}
    path = config_path(config_file)
    doc = read_config(path)
    env = read_env(warn)
    section = doc.get(cls.section, {}) if cls.section else {}
    layers: list[tuple[str, dict]] = [
        (STORED, dict(base or {})),
        (f"{path} (top level)", {k: v for k, v in doc.items() if not isinstance(v, dict)}),
        (f"{path} [{cls.section}]", {k: v for k, v in section.items() if not isinstance(v, dict)}),
    ]
    later = [("environment", env), ("flags", flags)]

    if issubclass(cls, PretrainSettings):
        method = _pick("method", layers + later, PretrainSettings.model_fields["method"].default)
        method = str(method).strip().lower()
        cls = settings_model(method)  # an unknown method is a UsageError listing the known ones
        table = section.get(method, {})
        layers.append((f"{path} [{PretrainSettings.section}.{method}]", table if isinstance(table, dict) else {}))
        _check_method_flags(flags, cls, method)
    layers += later

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for label, layer in layers:
        for key, value in layer.items():
            if key in cls.model_fields:
                values[key], sources[key] = value, label
    unknown = sorted(set(flags) - set(cls.model_fields))
    if unknown:  # a caller's bug, or a flag of another verb
        raise UsageError(f"{flag_name(unknown[0])} is not an option of this command")
    try:
        settings = cls(**values)
    except ValidationError as e:
        raise _value_error(e, sources, values) from None
    if base is not None:
        check_unchanged(settings, base, sources, may_change)
    return settings


STORED = "the stored settings of the run"


def check_unchanged(settings: SettingsModel, stored: dict[str, Any], sources: dict[str, str], may_change: set[str]) -> None:
    """A resumed run trains what it started to: a setting outside ``may_change`` that a layer
    above the stored settings changes is refused, naming that layer (flag, variable, file)."""
    now = settings.to_config()
    # a changed method is the engine's to name (``check_resume_config``): its settings differ anyway
    differ = sorted(k for k in stored if k in now and k not in may_change | {"method"} and now[k] != stored[k])
    if differ:
        def layer(k: str) -> str:
            source = sources.get(k)
            return {"flags": flag_name(k), "environment": env_name(k)}.get(source, source or "the defaults")

        parts = [f"{k.replace('_', '-')} is {now[k]!r} from {layer(k)} but {stored[k]!r} in the run" for k in differ[:3]]
        raise UsageError("cannot resume with different settings: " + "; ".join(parts),
                         "resume without them (the run's own settings are kept), or start over with --force")


def _pick(key: str, layers: list[tuple[str, dict]], default: Any) -> Any:
    value = default
    for _, layer in layers:
        if layer.get(key) is not None:
            value = layer[key]
    return value


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


def _value_error(e: ValidationError, sources: dict[str, str], values: dict[str, Any]) -> UsageError:
    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    msg = err["msg"].removeprefix("Value error, ")
    source = sources.get(name)
    where = env_name(name) if source == "environment" else flag_name(name)
    origin = "" if source in (None, "flags", "environment") else f" (from {source})"
    given = f" {values[name]!r}" if name in values and not isinstance(values[name], (list, dict)) else ""
    return UsageError(f"bad value{given} for {where}{origin}: {msg}")
