"""How an engine tells its caller about progress, without knowing about terminals.

Engines take a ``Reporter`` and call it; the CLI passes one that draws rich progress bars
on stderr, tests pass one that records, and the default does nothing.
"""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def listing(rows: list[tuple[str, str]], width: int = 76) -> str:
    """The lines of a help's ``\\b`` block: each label, then its text wrapped under itself so
    that no line is wider than ``width`` (an 80-column terminal shows the block unbroken)."""
    import textwrap

    label = max(len(name) for name, _ in rows)
    lines = []
    for name, text in rows:
        head, *rest = textwrap.wrap(text, width - 3 - label) or [""]
        lines += [f"      {name:<{label}} {head}", *(f"      {'':<{label}} {more}" for more in rest)]
    return "\n".join(lines)


class Reporter:
    """Silent reporter; subclasses render or record."""

    def start(self, name: str, total: int, unit: str = "step") -> None:
        """A task of ``total`` units begins (an epoch loop, an evaluation)."""

    def advance(self, n: int = 1, **info) -> None:
        """``n`` units done; ``info`` holds figures to show (loss=..., img_s=...)."""

    def finish(self) -> None:
        """The current task is over."""

    def log(self, message: str) -> None:
        """A line for people (stderr in the CLI)."""

    def warn(self, message: str) -> None:
        """A warning for people."""


class RecordingReporter(Reporter):
    """Keeps every call; used by tests."""

    def __init__(self):
        self.events: list[tuple] = []

    def start(self, name, total, unit="step"):
        self.events.append(("start", name, total))

    def advance(self, n=1, **info):
        self.events.append(("advance", n, info))

    def finish(self):
        self.events.append(("finish",))

    def log(self, message):
        self.events.append(("log", message))

    def warn(self, message):
        self.events.append(("warn", message))
