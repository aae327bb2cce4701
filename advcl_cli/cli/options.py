"""The command-line options: built from the settings models, plus the few that are not settings.

``settings_options(fields)`` turns settings fields into Typer options (``--batch-size`` for
``batch_size``, the field's help, its short flag), so an option is declared once, in the
settings model. Values arrive as strings (or lists of strings for repeatable list options, or
booleans for ``--x/--no-x``) and are parsed by the model's validators, the same way as the
TOML file and the environment. ``with_options(func, params)`` appends them to a command
function's signature; the function takes them as ``**options``.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

import typer
from pydantic.fields import FieldInfo
from rich.markup import escape

from ..settings import flag_name
from ..errors import UsageError

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML config file (default: $ADVCL_CONFIG or ./advcl.toml).", show_default=False, metavar="PATH"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.", metavar="")]
ModelArg = Annotated[
    Optional[str],
    typer.Argument(
        help="Checkpoint path, zoo name, or '-' / omitted to read a path from stdin.", show_default=False
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace what is already there (the run or file at --out, a --grid or "
                                                       "--plot file, a benchmark's finished cells) instead of refusing, or "
                                                       "reusing it; never the input model.", metavar="")]


# --- options from settings fields -------------------------------------------------------------


def _base_type(annotation: Any) -> Any:
    """The type inside Optional[...] / Annotated[...]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _base_type(args[0])
    real = [a for a in args if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(real) == 1:
        return _base_type(real[0])
    return annotation


# The one metavar style of every --help: a value's kind in capitals (INT, FLOAT, PATH, TEXT) or
# its choices (a|b), an argument's name in capitals (MODEL, FILE), nothing for an on/off flag.
METAVARS = {int: "INT", float: "FLOAT", Path: "PATH", str: "TEXT"}


def _metavar(field: FieldInfo) -> str | None:
    base = _base_type(field.annotation)
    if typing.get_origin(base) is typing.Literal:
        return "|".join(map(str, typing.get_args(base)))
    return METAVARS.get(base)


def _metavar_of(param) -> str:
    """A Typer parameter's metavar in the style above."""
    if param.param_type_name == "argument":
        return param.name.upper() + ("..." if param.nargs != 1 else "")
    if getattr(param, "is_flag", False):
        return ""
    kind = param.type_descriptor
    if kind.is_choice:
        return "|".join(map(str, kind.choices))
    base = _base_type(kind.annotation)
    base = typing.get_args(base)[0] if typing.get_origin(base) is list else base
    return METAVARS.get(Path if kind.is_path else base, "TEXT")


def set_metavars(command):
    """Give every parameter of the (Typer-built) ``command`` and its subcommands that has no
    metavar one in the style above, instead of the mix Typer shows by default (``<str>``,
    ``{name}``, ``<bool>``)."""
    ctx = command.context_class(command, info_name=command.name)
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and param.metavar is None:
            param.metavar = _metavar_of(param)
        if param is not None and param.param_type_name == "argument":  # NAME / [NAME] in usage, its kind beside it
            kind = METAVARS.get(Path if param.type_descriptor.is_path else str)
            param.display_type_rich = lambda ctx, kind=kind: kind
            param.get_usage_pieces = lambda ctx, p=param: [p.metavar if p.required else f"[{p.metavar}]"]
    for sub in getattr(command, "commands", {}).values():
        set_metavars(sub)
    return command


def is_eps(field: FieldInfo) -> bool:
    """Whether a settings field holds an L-inf budget (shown as k/255 in help)."""
    from ..settings import parse_eps, parse_eps_list

    return any(getattr(m, "func", None) in (parse_eps, parse_eps_list) for m in field.metadata)


def format_default(value: Any, eps: bool = False) -> str:
    """A default as help shows it: budgets as k/255 where exact, None as the method's rule."""
    from ..settings import format_eps

    if value is None:
        return "rule"
    if eps and isinstance(value, float):
        return format_eps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(format_default(v, eps) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_spec(name: str, field: FieldInfo, *, panel: str | None = None, defaults: str | None = None) -> dict:
    """What the option of a settings field shows and parses, as plain data (the help cache
    keeps it as JSON); ``defaults`` replaces the default shown in help."""
    extra = field.json_schema_extra or {}
    names = [flag_name(name), *(extra.get("aliases") or []), *([extra["short"]] if extra.get("short") else [])]
    base = _base_type(field.annotation)
    help_text = field.description or ""
    if defaults is None and field.default is not None and base is not bool:
        defaults = format_default(field.default, is_eps(field))
    if defaults:
        help_text += f" [default: {defaults}]"
    if base is bool:
        return dict(name=name, names=[f"{flag_name(name)}/--no-{name.replace('_', '-')}"], kind="bool", help=help_text,
                    metavar="", panel=panel)
    kind = "list" if typing.get_origin(base) is list else "str"
    return dict(name=name, names=names, kind=kind, help=help_text, metavar=extra.get("metavar") or _metavar(field), panel=panel)


def spec_parameter(spec: dict) -> inspect.Parameter:
    """The Typer option of an ``option_spec``."""
    typ = {"bool": Optional[bool], "list": Optional[list[str]], "str": Optional[str]}[spec["kind"]]
    option = typer.Option(*spec["names"], help=escape(spec["help"]), show_default=False, rich_help_panel=spec["panel"],
                          metavar=spec["metavar"])
    return inspect.Parameter(spec["name"], inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[typ, option])


def settings_option(name: str, field: FieldInfo, *, panel: str | None = None, defaults: str | None = None) -> inspect.Parameter:
    """One Typer option for a settings field; ``defaults`` replaces the default shown in help."""
    return spec_parameter(option_spec(name, field, panel=panel, defaults=defaults))


def settings_options(model, exclude: Iterable[str] = (), panel: str | None = None) -> list[inspect.Parameter]:
    """Options for every field of a settings model that has a flag."""
    skip = set(exclude)
    return [
        settings_option(name, field, panel=panel)
        for name, field in model.model_fields.items()
        if name not in skip and (field.json_schema_extra or {}).get("flag", True)
    ]


def with_options(func, params: list[inspect.Parameter]):
    """``func`` with ``params`` appended to its signature (Typer reads the signature) and its
    docstring reflowed; the function receives them in ``**options``."""
    documented(func)
    if not hasattr(func, "_own_signature"):  # the function's own parameters, before any options were added
        func._own_signature = inspect.signature(func)
    sig = func._own_signature
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    func.__signature__ = sig.replace(parameters=own + params)
    func.__annotations__ = {p.name: p.annotation for p in own + params}
    return func


def reflow(text: str | None) -> str:
    """Help text for rich output: each paragraph one line (the terminal wraps it), except the
    ``\\b`` blocks (examples), which keep their lines."""
    paragraphs = inspect.cleandoc(text or "").split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def documented(func):
    """``func`` with its docstring reflowed (see ``reflow``), for Typer to show."""
    func.__doc__ = reflow(func.__doc__)
    return func


# --- the MODEL argument and outputs -----------------------------------------------------------


def stdin_lines(what: str, hint: str) -> list[str]:
    """The non-empty lines of stdin, for an argument given as '-' or not at all (``what``:
    the argument's name, for the error)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(f"no {what} given", hint)
    try:
        text = sys.stdin.read()
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"no {what} given: stdin was empty", "did the command before the pipe fail?")
    if lines[0].startswith(("{", "[")):
        return [_json_path(text, what)]
    return lines


def _json_path(text: str, what: str) -> str:
    """The ``path`` of a JSON document on stdin (what `--json` of pretrain, finetune, lpaft,
    import and pull prints)."""
    import json

    hint = "pipe a command that makes a file (pretrain, finetune, import, pull), with or without --json"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"stdin holds no {what}: it starts like JSON but is not one JSON document", hint) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("path"), str) or not doc["path"]:
        raise UsageError(f"stdin holds a JSON document without a 'path', not a {what}", hint)
    return doc["path"]


def model_path(value: str | None, config: Path | None = None) -> Path:
    """Resolve a MODEL argument: a path, a zoo name (pulled with the ``[hub]`` settings), or a
    path on stdin."""
    if value in (None, "-"):
        value = stdin_lines("MODEL", "pass a checkpoint path or zoo name, or pipe one: advcl pull NAME | advcl eval")[-1]
    from ..settings.layering import resolve as resolve_settings
    from ..settings import HubSettings
    from ..zoo import resolve
    from .output import Output

    hub = resolve_settings(HubSettings, {}, config_file=config)
    return resolve(value, endpoint=hub.hf_endpoint, manifest=hub.zoo_manifest, reporter=Output().reporter())


def refuse_overwrite(path: Path, force: bool, flag: str = "--out") -> None:
    """An output file that exists is replaced only with --force."""
    if path.exists() and not force:
        raise UsageError(f"{flag} {path} already exists", f"pass --force to overwrite it, or choose another {flag} path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_output(path: Path | None, force: bool, flag: str = "--out",
                 inputs: dict[str, Path | None] | None = None, suffix: str | None = None) -> None:
    """The overwrite rule every verb follows, checked before any work: an output is never one
    of the command's inputs (not even with --force), an existing file is replaced only with
    --force, and its folder must be writable. ``inputs`` maps what an input is ("the model
    being attacked") to its path; ``suffix`` is the one file type written (".png")."""
    from ..checkpoint import check_writable

    if path is None:
        return
    for what, source in (inputs or {}).items():
        if source is not None and _same_file(Path(path), Path(source)):
            raise UsageError(f"{flag} {path} is {what}",
                             f"choose another {flag} path: a command never writes over its input")
    check_writable(path, flag)  # first: --force cannot help a folder, or a folder that is not writable
    if suffix is not None and Path(path).suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: advcl writes a {suffix[1:].upper()} file there",
                         f"name it {Path(path).with_suffix(suffix).name}")
    refuse_overwrite(Path(path), force, flag)
