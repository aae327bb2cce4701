"""The pretraining methods, one module each (see ``base.Method``); losses are pure functions in
``losses.py``.

The built-in methods and those of installed plugins (entry point group ``advcl.methods``, each
naming a ``Method`` subclass, e.g. ``toy = "my_package.toy:Toy"`` under
``[project.entry-points."advcl.methods"]``) are found by name. Nothing is imported until a
method is asked for, so commands that train nothing start without importing torch. When every
method is needed (``methods()``: the help, the settings table), a plug-in that fails to load is
left out with a warning naming it, and the other verbs work as before; asking for it by name
is the one error. Two methods that declare one option name with different meanings (type,
input file, flag or not) are refused by ``advcl pretrain`` as it builds its flags
(``check_options``).
"""

from __future__ import annotations

import copy
import functools
import warnings
from importlib import import_module
from importlib.metadata import entry_points

from pydantic import create_model

from ..errors import AdvclWarning, UsageError
from ..settings import PretrainSettings

ENTRY_POINT_GROUP = "advcl.methods"
BUILTIN = {
    "advcl": "advcl_cli.methods.advcl:AdvCL",
    "acl": "advcl_cli.methods.acl:ACL",
    "dynacl": "advcl_cli.methods.dynacl:DynACL",
    "simclr": "advcl_cli.methods.simclr:SimCLR",
    "deacl": "advcl_cli.methods.deacl:DeACL",
    "air": "advcl_cli.methods.air:AIR",
    "dynacl-air": "advcl_cli.methods.air:DynACLAIR",
}


@functools.cache
def _targets() -> dict[str, str]:
    """name -> "module:Class", the built-in methods first; a plugin cannot replace one."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name.lower(), ep.value)
    return found


def method_names() -> list[str]:
    return list(_targets())


@functools.cache
def get_method(name: str):
    """The ``base.Method`` subclass called ``name`` (any letter case)."""
    from .base import Method, TrainSettings  # the methods import torch: only when one is asked for

    key = str(name).strip().lower()
    target = _targets().get(key)
    if target is None:
        raise UsageError(f"unknown method '{name}'", f"choose one of: {', '.join(method_names())}")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(import_module(module), attr)
    except Exception as e:  # a missing module, a plug-in's own bug at import: its name and the cause
        raise UsageError(f"method '{key}' could not be loaded from {target}: {type(e).__name__}: {e}",
                         "reinstall the plugin that provides it") from None
    if not (isinstance(cls, type) and issubclass(cls, Method) and issubclass(cls.Settings, TrainSettings)):
        raise UsageError(f"method '{key}' ({target}) is not an advcl Method with a Settings model")
    clash = sorted(set(cls.Settings.model_fields) & set(PretrainSettings.model_fields))
    if clash:
        raise UsageError(f"method '{key}' redefines the pretraining settings {', '.join(clash)}")
    return cls


@functools.cache
def methods() -> dict:
    """Every method that loads, name -> class; a plug-in that does not is left out, with a
    warning naming it and what failed (a built-in one that fails is a bug, and raises)."""
    found = {}
    for name in method_names():
        try:
            found[name] = get_method(name)
        except UsageError as e:
            if name in BUILTIN:
                raise
            warnings.warn(f"the plug-in method '{name}' is left out: {e.message}", AdvclWarning, stacklevel=2)
    return found


def _meaning(field) -> tuple:
    extra = field.json_schema_extra or {}
    return repr(field.annotation), extra.get("input"), extra.get("flag", True)


def check_options() -> None:
    """Methods may share an option name only with one meaning (its type, the file it names,
    flag or not: a shared name is one flag and one TOML key); else a UsageError naming both."""
    seen: dict[str, tuple[str, tuple]] = {}
    for name, cls in methods().items():
        for field, info in cls.Settings.model_fields.items():
            first, meaning = seen.setdefault(field, (name, _meaning(info)))
            if meaning != _meaning(info):
                raise UsageError(f"the methods '{first}' and '{name}' both declare the option --{field.replace('_', '-')} "
                                 "with different meanings", "uninstall one of their plug-ins, or ask its author to rename it")


def method_for(name: str):
    """The method whose name or ``aliases`` is ``name`` (a checkpoint's method), or None."""
    key = str(name).strip().lower()
    if key in _targets():
        return get_method(key)
    return next((cls for cls in methods().values() if key in cls.aliases), None)


@functools.cache
def settings_model(name: str) -> type[PretrainSettings]:
    """One flat settings model for pretraining with method ``name``: the run's settings
    (``PretrainSettings``) plus the method's own."""
    cls = get_method(name)
    method = copy.copy(PretrainSettings.model_fields["method"])
    method.default = cls.name
    return create_model(f"{cls.__name__}PretrainSettings", __base__=(PretrainSettings, cls.Settings),
                        method=(PretrainSettings.model_fields["method"].annotation, method))

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "check_options", "get_method", "method_for", "method_names", "methods",
           "settings_model"]
