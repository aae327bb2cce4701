"""The zoo manifest: named checkpoints, where they live on the Hub, and what they are claimed to do.

One TOML table per entry. A published entry pins a Hugging Face ``repo``, a 40-hex commit
``revision``, a ``filename`` and the file's ``sha256``; an unpublished one (no ``repo``) carries
only its claims and the ``recipe`` that reproduces it. Every metric says where its number comes
from: ``reported`` (with the ``source``) or ``measured`` by this project (with the ``command``).

The manifest that ships with advcl is ``advcl_cli/zoo/manifest.toml`` (package data, so an
installed wheel finds it; the checkout's ``zoo/manifest.toml`` is a link to it). ``--manifest
FILE`` or ``ADVCL_ZOO_MANIFEST`` selects another one, such as a team's own zoo.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..benchmark.reported import SHIPPED as SHIPPED_REPORTED
from ..benchmark.reported import load_reported
from ..errors import TOO_DEEP, UsageError
from ..settings import Scheme, format_eps, parse_eps
from .hubspec import filename_problem, repo_id_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED = Path(__file__).with_name("manifest.toml")
METRIC_NAMES = {"sa": "SA", "pgd20": "PGD-20 RA", "aa": "AA"}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
HEX40 = r"^[0-9a-f]{40}$"
HEX64 = r"^[0-9a-f]{64}$"


class Metric(BaseModel):
    """One accuracy (percent) and where it comes from."""

    model_config = ConfigDict(extra="forbid")

    value: float = Field(ge=0, le=100)
    status: Literal["reported", "measured"]
    source: str | None = None  # reported: an id of reported.toml's sources, or free text (paper, table)
    command: str | None = None  # measured: the advcl command that produced it

    @model_validator(mode="after")
    def _provenance(self):
        if self.status == "reported" and not self.source:
            raise ValueError("a reported metric needs a 'source'")
        if self.status == "measured" and not self.command:
            raise ValueError("a measured metric needs the 'command' that measured it")
        return self


class Entry(BaseModel):
    """A named model: its location (when published), its claims and its recipe."""

    model_config = ConfigDict(extra="forbid")

    repo: str | None = None
    revision: str | None = Field(None, pattern=HEX40)
    filename: str = "model.safetensors"
    sha256: str | None = Field(None, pattern=HEX64)
    kind: Literal["encoder", "classifier"]
    arch: str
    method: str
    dataset: str
    scheme: Scheme | None = None
    eps: Annotated[float, BeforeValidator(parse_eps)] | None = None  # None: not adversarial (simclr)
    metrics: dict[Literal["sa", "pgd20", "aa"], Metric] = {}
    paper: str | None = None
    license: str | None = None
    notes: str | None = None
    recipe: list[str] = []

    @field_validator("repo", "filename")
    @classmethod
    def _hub_name(cls, value: str | None, info):
        problem = value is not None and (repo_id_problem if info.field_name == "repo" else filename_problem)(value)
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value

    @model_validator(mode="after")
    def _published(self):
        if self.repo is not None and (self.revision is None or self.sha256 is None):
            raise ValueError("a published entry (with 'repo') needs 'revision' (a 40-hex commit) and 'sha256'")
        if self.repo is None and (self.revision is not None or self.sha256 is not None):
            raise ValueError("'revision' and 'sha256' need a 'repo'")
        if self.kind == "encoder" and self.scheme is not None:
            raise ValueError("an encoder has no finetuning 'scheme'")
        return self

    @property
    def published(self) -> bool:
        return self.repo is not None


class Manifest:
    """The entries of one manifest file, in file order."""

    def __init__(self, path: Path, entries: dict[str, Entry], header: str = ""):
        self.path = path
        self.entries = entries
        self.header = header

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> Entry:
        """The entry, or a usage error that suggests close names."""
        if name in self.entries:
            return self.entries[name]
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown zoo model '{name}' (manifest {self.path})", f"{hint}`advcl zoo list` shows them all")


def _revision_hint(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc and loc[-1] == "revision":
        return " (pin a 40-hex commit, not a branch or tag)"
    return ""


def parse_manifest(text: str, path: Path) -> Manifest:
    """Validate a manifest document; errors name the entry and the field."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"manifest {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise UsageError(f"manifest {path} is not valid TOML: {TOO_DEEP}") from None
    entries: dict[str, Entry] = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise UsageError(f"manifest {path}: top-level key '{name}' must be a table [{name}] describing a model")
        entries[name] = validate_entry(name, table, path)
    check_reported(entries, path)
    header = "".join(_leading_comments(text)).rstrip()
    header = header + "\n" if header else ""
    return Manifest(path, entries, header)


def validate_entry(name: str, table: dict, path: Path) -> Entry:
    """One entry of manifest ``path``; errors name the manifest, the entry and the field."""
    if not NAME_RE.match(name):
        raise UsageError(f"manifest {path}: bad entry name '{name}'", "use lower-case letters, digits, '-', '_' and '.'")
    try:
        return Entry.model_validate(table)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(entry)"
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"manifest {path}: entry '{name}', field '{where}': {msg}{_revision_hint(err)}") from None


def check_reported(entries: dict[str, Entry], path: Path) -> None:
    """A reported metric whose ``source`` is an id of the published numbers (``reported.toml``,
    which the benchmark's leaderboard reads too) must be the number that file gives for the
    entry's method, dataset and scheme: the two files cannot drift apart. Other sources are free
    text (a team's own manifest)."""
    reported = load_reported()
    for name, entry in entries.items():
        for key, metric in entry.metrics.items():
            if metric.status != "reported" or metric.source not in reported.sources:
                continue
            found = entry.scheme and reported.lookup(entry.method, entry.dataset, entry.scheme, key, metric.source)
            published = getattr(found[0], key) if found else None
            if published != metric.value:
                said = f"gives {published}" if found else f"has no {key} for {entry.method} {entry.scheme or ''} on {entry.dataset}"
                raise UsageError(f"manifest {path}: entry '{name}', metric '{key}' is {metric.value}, but source "
                                 f"'{metric.source}' in {SHIPPED_REPORTED.name} {said}",
                                 "take the number from the source, or name another source")


def _leading_comments(text: str):
    for line in text.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            return
        yield line


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and validate a manifest (default: the one shipped with advcl)."""
    path = Path(path) if path is not None else SHIPPED
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such manifest file: {path}", "check --manifest / ADVCL_ZOO_MANIFEST") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"manifest {path} is not UTF-8 text (bad byte at offset {e.start})", "a manifest is a TOML file") from None
    except OSError as e:
        raise UsageError(f"cannot read manifest {path}: {e.strerror}") from None
    return parse_manifest(text, path)


def manifest_path(explicit: str | Path | None = None) -> Path:
    """``explicit`` (the CLI's ``--manifest`` or ``[hub] zoo_manifest``) > ADVCL_ZOO_MANIFEST >
    the shipped one; the environment is read now, never advcl.toml (that is the CLI's)."""
    chosen = explicit or os.environ.get("ADVCL_ZOO_MANIFEST")
    return Path(chosen).expanduser() if chosen else SHIPPED


# --- writing -------------------------------------------------------------------------------

_FIELD_ORDER = [
    "repo", "revision", "filename", "sha256", "kind", "arch", "method", "dataset", "scheme", "eps",
    "paper", "license", "notes", "recipe",
]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + "".join(f"  {_toml_value(v)},\n" for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to the manifest")


def entry_to_toml(name: str, entry: Entry) -> str:
    data = entry.model_dump(exclude_none=True)
    if entry.repo is None:
        del data["filename"]  # only meaningful once published
    if entry.eps is not None:
        data["eps"] = format_eps(entry.eps)
    lines = [f"[{name}]"]
    for key in _FIELD_ORDER:
        if key in data and data[key] != []:
            lines.append(f"{key} = {_toml_value(data[key])}")
    for metric, m in entry.metrics.items():
        lines.append("")
        lines.append(f"[{name}.metrics.{metric}]")
        for key, value in m.model_dump(exclude_none=True).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def manifest_to_toml(manifest: Manifest) -> str:
    body = "\n".join(entry_to_toml(name, entry) for name, entry in manifest.entries.items())
    return manifest.header + ("\n" if manifest.header and body else "") + body


def render_manifest(manifest: Manifest) -> str:
    """The manifest's TOML, or a UsageError if it would not read back."""
    text = manifest_to_toml(manifest)
    parse_manifest(text, manifest.path)
    return text


def write_manifest(manifest: Manifest) -> Path:
    """Write atomically (through a link to the file it points at); never a manifest that would
    not read back."""
    from ..checkpoint import atomic_write

    text = render_manifest(manifest)
    target = manifest.path.resolve()
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
