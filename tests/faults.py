"""Disk faults for tests, injected at the ``os`` calls advcl writes through.

Tests run as root here, and permission bits do not stop root; a full disk cannot be made
without filling one. So ``read_only`` makes a folder behave as on a read-only file system
(creating a file or folder in it, or opening one for writing, fails with EROFS, as the kernel
would say), and ``disk_full`` makes every ``os.write`` into a file under a folder fail with
ENOSPC. Reading is untouched.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder)
    except TypeError:  # a file descriptor, not a path
        return False


def read_only(monkeypatch, folder) -> Path:
    """``folder`` (and everything under it) as on a read-only file system."""
    folder = Path(folder).resolve()
    real_open, real_mkdir = os.open, os.mkdir

    def fail(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if flags & _WRITE_FLAGS and _under(path, folder):
            fail(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if _under(path, folder) and not os.path.exists(path):  # an existing one: EEXIST, as the kernel says
            fail(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return folder


def disk_full(monkeypatch, folder, names=None) -> Path:
    """Every ``os.write`` into a file under ``folder`` (whose name contains one of ``names``,
    when given) fails with ENOSPC; the written files are the temporary ones of an atomic write."""
    folder = Path(folder).resolve()
    real_write = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if _under(target, folder) and (names is None or any(n in os.path.basename(target) for n in names)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return folder
