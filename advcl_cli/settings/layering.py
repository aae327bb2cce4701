"""Resolving settings from their layers on pydantic-settings; only ``cli/`` calls ``resolve``.

Layers, lowest first: the defaults; a resumed run's stored settings; the TOML file: its top level,
the verb's table (``[pretrain]``), for pretraining the method's (``[pretrain.acl]``); ``ADVCL_*``;
the flags. pydantic-settings layers them: its ``EnvSettingsSource`` (``env_prefix="ADVCL_"``) and
a ``Layer`` source for the flags, each table and the stored settings, in the order
``settings_customise_sources`` gives. Beside what ``advcl_cli.config`` does for the file and the
environment, two additions pydantic-settings has no place for:

- ``origin``: which source gave a value, for the error that refuses it;
- ``check_unchanged``: a resumed run refuses a changed setting that is not ``resume_may_change``.

A module of its own so that importing the settings models (every command does, for its flags)
does not import pydantic-settings.
"""

from __future__ import annotations

from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from ..config import ENV_PREFIX, Warn, config_path, read_config, read_env
from ..errors import UsageError
from ..methods import method_names, settings_model
from . import MethodSettings, PretrainSettings, SettingsModel, env_name, flag_name, method_models

STORED = "the stored settings of the run"



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
    from ..engine.run import check_resume_config

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
