"""Waiting in tests: for an event (a file, a process's exit), never for an amount of time.

``HANG_S`` bounds a wait only so that a test that hangs fails instead of running forever. It is
no speed check: on a loaded 2-core machine (load ~17) a step takes many times its usual time, so
the guard is minutes. Every subprocess timeout and polling loop in tests/ uses it.
"""

import subprocess
import time
from typing import Callable

HANG_S = 900


def wait_for(event: Callable[[], bool], what: str, proc: subprocess.Popen | None = None, guard: float = HANG_S) -> None:
    """Poll until ``event()`` is true; fail if ``proc`` ends first, or after ``guard`` seconds (a hang)."""
    deadline = time.monotonic() + guard
    while not event():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {guard} s: it hangs")
        time.sleep(0.02)
