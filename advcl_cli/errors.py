"""The project's errors. Each carries a one-line message, a hint (what to do) and an exit code.

The CLI's one error handler (``advcl_cli.cli.app.main``) turns them into two lines on stderr and
the exit code; nothing else in the package prints errors or calls ``sys.exit``.
"""

from __future__ import annotations


class AdvclError(Exception):
    """Base class. ``exit_code`` 2 means bad usage or input, 1 a runtime failure."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(AdvclError):
    """Bad usage or bad input: unknown dataset, bad option value, unreadable file."""

    exit_code = 2


class CheckpointError(UsageError):
    """A file that is not a valid advcl checkpoint (or not the kind the command needs)."""


class DataError(UsageError):
    """A dataset that is unknown, missing on disk, or does not fit the model."""


class DownloadError(AdvclError):
    """A download (dataset, hub file) failed at run time."""

    exit_code = 1


class TrainingError(AdvclError):
    """A training run failed: diverged loss, a rank that died."""

    exit_code = 1


class Interrupted(AdvclError):
    """Ctrl-C or SIGTERM ended a job that keeps its finished work (exit 130)."""

    exit_code = 130
