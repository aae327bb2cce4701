"""The project's errors. Each carries a one-line message, a hint (what to do) and an exit code.

The CLI's one error handler (``advcl_cli.cli.app.main``) turns them into two lines on stderr and
the exit code; nothing else in the package prints errors or calls ``sys.exit``. An OSError on a
path becomes one of them through ``os_error`` (exit 2 for a bad path, 1 for a failing disk).
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path


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


class DiskError(AdvclError):
    """The machine failed a read or write that was right to try: a full disk, a quota, an I/O error."""

    exit_code = 1


class Interrupted(AdvclError):
    """Ctrl-C, or SIGTERM during training."""

    exit_code = 130


class Requeued(AdvclError):
    """Not a failure: a training run saved its state on SIGUSR1 and requeued its Slurm job
    (``engine.stop``); the command says so and exits 0."""

    exit_code = 0


class AdvclWarning(UserWarning):
    """A warning for people (a plug-in that fails to load): the CLI prints it as one
    ``warning:`` line on stderr (``cli.app.main``); library users see a Python warning."""


# why a JSON or TOML document nested thousands deep (Python's parsers recurse: RecursionError) is refused
TOO_DEEP = "nested too deeply"


def require_file(path, what: str, hint: str | None = None, error: type[UsageError] = UsageError, flag: str = "",
                 pipe: bool = False):
    """``path`` as a Path when it is a regular file (or, with ``pipe``, a FIFO: ``--config <(...)``);
    else an ``error`` saying what it is: a folder, a loop of links, a FIFO or device, or missing
    (``what``: "checkpoint file", ...; ``flag`` names the option it came from)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path} is a loop of symbolic links, not a {what}{flag}", "point the link at a file") from None
        raise error(f"no such {what}: {path}{flag}", hint) from None
    if stat.S_ISDIR(mode):
        raise error(f"{path} is a folder, not a {what}{flag}", "name the file in it")
    if stat.S_ISREG(mode) or (pipe and stat.S_ISFIFO(mode)):
        return path
    kind = next((k for test, k in _SPECIAL if test(mode)), "not a regular file")
    raise error(f"{path} is {kind}, not a {what}{flag}", "name a regular file")


_SPECIAL = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


# errno values that say the user's path is wrong (exit 2); any other OSError is the environment's (exit 1)
_PATH_ERRNOS = {
    errno.EROFS: "the file system is read-only: choose a path on another one",
    errno.EACCES: "you may not {verb} there: choose another path or fix its permissions",
    errno.EPERM: "you may not {verb} there: choose another path or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: name a file",
    errno.EEXIST: "something is already there: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a loop of symbolic links",
}
_DISK_HINTS = {
    errno.ENOSPC: "free some space on that disk, or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free some space, or write somewhere else",
    errno.EIO: "the disk failed to {verb}: check it, or use another one",
}


def os_error(e: OSError, path=None, verb: str = "write") -> AdvclError:
    """An OSError on a path the user gave, as one line naming the path and the cause: a
    UsageError (exit 2) when the path is wrong (read-only, not permitted, not a folder, missing),
    a DiskError (exit 1) when the machine failed (full disk, quota, I/O error, anything else)."""
    path = path if path is not None else (e.filename or "?")
    cause = e.strerror or str(e) or type(e).__name__
    message = f"cannot {verb} {path}: {cause}"
    if e.errno in _PATH_ERRNOS:
        return UsageError(message, _PATH_ERRNOS[e.errno].format(verb=verb))
    return DiskError(message, _DISK_HINTS.get(e.errno, "check the disk and run again").format(verb=verb))
