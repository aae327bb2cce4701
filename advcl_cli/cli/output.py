"""The one output sink: data to stdout, people's text to stderr.

stdout carries only data: an artifact's path (one line), a table, or one JSON document with
``--json``. Logs, warnings and progress go to stderr, drawn with rich when stderr is a
terminal and as plain periodic lines when it is not (cluster job logs).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..report import Reporter


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rich_table(rows: list[dict], columns: Iterable[str] | None, title: str | None) -> Table:
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    return table


def printable(text: str, keep: str = "") -> str:
    """``text`` with each character that is not printable (but those in ``keep``) as its Python
    escape: a newline or a terminal escape code in a file name cannot split a message or drive
    the terminal."""
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in str(text))


class Output:
    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    # --- data (stdout) ---------------------------------------------------------------
    def result(self, value: Any) -> None:
        """An artifact's path or a single value: one line on stdout."""
        print(value, file=sys.stdout, flush=True)

    def document(self, doc: Any) -> None:
        """One JSON document on stdout."""
        print(json.dumps(doc, indent=2, default=str), file=sys.stdout, flush=True)

    def table(self, rows: list[dict], columns: Iterable[str] | None = None, title: str | None = None, doc: Any = None) -> None:
        """A table for people, or with --json the document ``doc`` (default: the rows)."""
        if self.json_mode:
            self.document(rows if doc is None else doc)
            return
        Console(file=sys.stdout, highlight=False, soft_wrap=True).print(_rich_table(rows, columns, title))

    # --- people (stderr) -------------------------------------------------------------
    def log(self, message: str) -> None:
        self.err.print(printable(message, "\n"), markup=False)

    def warn(self, message: str) -> None:
        self.err.print(f"warning: {printable(message)}", style="yellow", markup=False)

    def log_table(self, rows: list[dict], columns: Iterable[str] | None = None, title: str | None = None) -> None:
        """A table for people on stderr (progress of a long job; stdout keeps the data)."""
        self.err.print(_rich_table(rows, columns, title))

    def error(self, message: str, hint: str | None = None) -> None:
        self.err.print(f"error: {printable(message)}", style="red", markup=False)
        if hint:
            self.err.print(f"hint: {printable(hint)}", markup=False)

    def reporter(self) -> "ConsoleReporter":
        return ConsoleReporter(self)


class ConsoleReporter(Reporter):
    """Renders engine progress on stderr: a rich bar on a terminal, else a line every 10 s."""

    def __init__(self, out: Output, interval: float = 10.0):
        self.out = out
        self.interval = interval
        self.live = out.err.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.name = ""
        self.total = 0
        self.done = 0
        self.last = 0.0

    def start(self, name: str, total: int, unit: str = "step") -> None:
        self.finish()
        self.name, self.total, self.done, self.last = name, total, 0, time.monotonic()
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.out.err,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(name, total=total, info="")

    def advance(self, n: int = 1, **info) -> None:
        self.done += n
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=n, info=text)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            self.out.log(f"{self.name} {self.done}/{self.total} {text}".rstrip())

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(printable(message, "\n"), markup=False)
        else:
            self.out.log(message)

    def warn(self, message: str) -> None:
        self.log(f"warning: {printable(message)}")
