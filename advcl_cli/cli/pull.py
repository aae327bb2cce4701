"""`advcl pull` (not built yet)."""

from __future__ import annotations

from ..errors import NotImplementedYet


def pull() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("pull")
