"""`advcl push` (not built yet)."""

from __future__ import annotations

from ..errors import NotImplementedYet


def push() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("push")
