"""``leaderboard.md`` in the RobustSSL layout: one row per encoder, RA / CA / SA per finetuning
scheme, and under it the published numbers for the same method and dataset when a source
reports them (``reported.toml``).

The input is the benchmark's result records, one per (encoder, scheme) cell, as dicts (the
records of ``results.json``): ``encoder`` (a display name), ``sha256``, ``method``,
``dataset``, ``scheme`` and the accuracies as fractions: ``sa``, ``ra`` (robust accuracy under
``ra_attack``, AutoAttack by default; taken from ``aa`` when absent), ``aa`` (AutoAttack),
``pgd20``, ``ca`` (None when not measured), with ``seconds``, ``n``, ``eps`` and
``corruptions`` (the set CA was measured on) and ``deviations`` (settings off the protocol, for
the caption). Published RA is AutoAttack's; when ours is not,
the caption says so. Pure functions; writing is atomic.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checkpoint import atomic_write
from ..settings import format_eps
from .reported import SCHEMES, Reported, load_reported

COLUMNS = (("RA", "ra"), ("CA", "ca"), ("SA", "sa"))
MISSING = "-"


class Cell(BaseModel):
    """One benchmark cell: an encoder finetuned with one scheme and evaluated (fractions)."""

    model_config = ConfigDict(extra="allow")

    encoder: str
    sha256: str
    method: str
    dataset: str
    scheme: str = Field(pattern="^(slf|alf|aff|autolora)$")
    sa: float | None = None
    ra: float | None = None
    ra_attack: str = "autoattack"
    aa: float | None = None
    pgd20: float | None = None
    ca: float | None = None
    seconds: float | None = None
    n: int | None = None
    eps: float | None = None
    corruptions: str | None = None

    @model_validator(mode="after")
    def _ra_from_aa(self):
        if self.ra is None and self.ra_attack == "autoattack":
            self.ra = self.aa
        return self


def _pct(value: float | None, scale: float = 100.0) -> str:
    return MISSING if value is None else f"{value * scale:.2f}"


def group_cells(records: list[dict]) -> tuple[list[str], list[dict[str, Cell]]]:
    """(schemes present, in SCHEMES order; per encoder and dataset, in order of first appearance,
    its cells by scheme). A later record of the same cell replaces an earlier one."""
    cells = [Cell.model_validate(r) for r in records]
    encoders: dict[tuple[str, str], dict[str, Cell]] = {}
    for c in cells:
        encoders.setdefault((c.sha256, c.dataset), {})[c.scheme] = c
    return [s for s in SCHEMES if any(c.scheme == s for c in cells)], list(encoders.values())


def leaderboard_table(records: list[dict], reported: Reported | None = None) -> tuple[list[str], list[list[str]], list]:
    """(header, rows, sources): the table as strings. Rows are the encoders in the order they
    first appear, each followed by a "reported" row when its method and dataset are known;
    ``sources`` lists the sources those rows cite, numbered from 1 in the table."""
    reported = reported if reported is not None else load_reported()
    schemes, encoders = group_cells(records)
    header = ["encoder", "method", "dataset"] + [f"{s.upper()} {name}" for s in schemes for name, _ in COLUMNS]
    rows, sources = [], []
    for by_scheme in encoders:
        first = next(iter(by_scheme.values()))
        row = [f"{first.encoder} ({first.sha256[:8]})", first.method, first.dataset]
        for s in schemes:
            c = by_scheme.get(s)
            row += [_pct(getattr(c, key) if c is not None else None) for _, key in COLUMNS]
        rows.append(row)
        published = reported.row_for(first.method, first.dataset)
        if published is not None:
            source = reported.sources[published.source]
            if source not in sources:
                sources.append(source)
            line = [f"reported: {published.label} [{sources.index(source) + 1}]", published.method, published.dataset]
            for s in schemes:
                numbers = getattr(published, s)
                line += [_pct(getattr(numbers, key) if numbers is not None else None, 1.0) for _, key in COLUMNS]
            rows.append(line)
    return header, rows, sources


def leaderboard_markdown(records: list[dict], reported: Reported | None = None, title: str | None = None) -> str:
    """The leaderboard as a Markdown document."""
    header, rows, sources = leaderboard_table(records, reported)
    cells = [Cell.model_validate(r) for r in records]
    eps = sorted({c.eps for c in cells if c.eps is not None})
    corrupt = sorted({c.corruptions for c in cells if c.corruptions})
    datasets = sorted({c.dataset for c in cells})
    attacks = sorted({c.ra_attack for c in cells if c.ra is not None}) or ["autoattack"]
    budget = f"L-inf eps {', '.join(map(format_eps, eps)) or '8/255'}"
    if attacks == ["autoattack"]:
        ra = f"AutoAttack (standard, {budget})"
    else:
        ra = f"{', '.join('AutoAttack' if a == 'autoattack' else a for a in attacks)} ({budget}; published RA is AutoAttack's)"
    lines = [f"# {title or 'Benchmark: ' + ', '.join(datasets)}", ""]
    lines.append(
        f"RA: robust accuracy under {ra}; "
        f"CA: mean accuracy over 15 corruptions x 5 severities ({', '.join(corrupt) or 'not measured'}); "
        f"SA: standard accuracy. Percent; {MISSING} = not measured. \"reported\" rows are published numbers "
        "for the same method and dataset."
    )
    off = list(dict.fromkeys(d for r in records for d in (r.get("deviations") or [])))
    if off:
        lines += ["", f"Not the published protocol: {', '.join(off)}."]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if sources:
        lines.append("")
        lines += [f"[{i}] {s.title}: {s.url}" + (f" (code: {s.code})" if s.code else "") for i, s in enumerate(sources, 1)]
    return "\n".join(lines) + "\n"


def write_leaderboard(records: list[dict], path: str | Path, reported: Reported | None = None,
                      title: str | None = None) -> Path:
    text = leaderboard_markdown(records, reported, title)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
