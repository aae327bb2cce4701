"""Published benchmark numbers (``reported.toml``, package data), validated with pydantic.

``load_reported()`` reads the shipped file (or another one); ``Reported.lookup(method, dataset,
scheme)`` gives the first row's numbers for that cell with its source, or None. Numbers are
percents, as published; advcl's own results are fractions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UsageError
from ..settings import Scheme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED = Path(__file__).with_name("reported.toml")
Percent = Annotated[float | None, Field(ge=0, le=100)]


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    url: str = Field(pattern=r"^https?://")
    code: str | None = Field(None, pattern=r"^https?://")


# The method a checkpoint records (``meta.method``, as each pretraining method or importer names
# its encoders) -> the method id of its rows below; a method missing here has no published rows
# (simclr: the non-robust baseline). The one place where the two namings meet.
REPORTED_IDS = {
    "advcl": "advcl", "acl": "acl", "dynacl": "dynacl", "dynacl++": "dynacl++", "acl-air": "acl-air",
    "dynacl-air": "dynacl-air", "dynacl-air++": "dynacl-air++", "deacl": "deacl", "rocl": "rocl", "dynacl-rcs": "dynacl-rcs",
    "a-infonce": "a-infonce",
}


def reported_id(method: str) -> str | None:
    """The reported-numbers id of a checkpoint's method, or None when no source reports it."""
    return REPORTED_IDS.get(str(method).strip().lower())


class Numbers(BaseModel):
    """One cell: SA, AutoAttack RA, PGD-20 RA and CA in percent (those the source gives)."""

    model_config = ConfigDict(extra="forbid")

    sa: Percent = None
    aa: Percent = None
    pgd20: Percent = None
    ca: Percent = None

    @property
    def ra(self) -> float | None:
        """The published RA: AutoAttack's."""
        return self.aa


class Row(BaseModel):
    """A method on a dataset, as one source reports it, per finetuning scheme."""

    model_config = ConfigDict(extra="forbid")

    source: str
    dataset: str
    method: str = Field(pattern=r"^[a-z0-9][a-z0-9+._-]*$")
    label: str
    arch: str = "resnet18"
    eps: str = "8/255"
    slf: Numbers | None = None
    alf: Numbers | None = None
    aff: Numbers | None = None
    autolora: Numbers | None = None


class Reported(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: dict[str, Source]
    numbers: list[Row]

    @model_validator(mode="after")
    def _known_sources(self):
        for i, row in enumerate(self.numbers):
            if row.source not in self.sources:
                raise ValueError(f"row {i + 1} ({row.method}, {row.dataset}) names unknown source '{row.source}'")
        keys = [(r.source, r.dataset, r.method) for r in self.numbers]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise ValueError(f"source '{twice[0]}' lists {twice[2]} on {twice[1]} twice")
        return self

    def row(self, method: str, dataset: str) -> Row | None:
        """The preferred (first) row for ``method`` on ``dataset``, or None."""
        method, dataset = str(method).strip().lower(), str(dataset).strip().lower()
        return next((r for r in self.numbers if r.method == method and r.dataset == dataset), None)

    def row_for(self, checkpoint_method: str, dataset: str) -> Row | None:
        """``row`` for the method a checkpoint records (through ``reported_id``)."""
        rid = reported_id(checkpoint_method)
        return self.row(rid, dataset) if rid is not None else None

    def lookup(self, method: str, dataset: str, scheme: Scheme,
               metric: str | None = None, source: str | None = None) -> tuple[Numbers, Source, Row] | None:
        """The first row for (method, dataset) with numbers for ``scheme`` (and ``metric``, when
        given; from ``source`` only, when given), with its source; None when none reports it."""
        method, dataset = str(method).strip().lower(), str(dataset).strip().lower()
        for row in self.numbers:
            cell = getattr(row, scheme)
            if row.method == method and row.dataset == dataset and cell is not None and source in (None, row.source):
                if metric is None or getattr(cell, metric) is not None:
                    return cell, self.sources[row.source], row
        return None


def load_reported(path: str | Path | None = None) -> Reported:
    """Read and validate a reported-numbers file (default: the one shipped with advcl)."""
    path = Path(path) if path is not None else SHIPPED
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no such reported-numbers file: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"reported-numbers file {path} is unreadable: {e}") from None
    try:
        return Reported.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(file)"
        raise UsageError(f"reported-numbers file {path}, {where}: {err['msg'].removeprefix('Value error, ')}") from None
