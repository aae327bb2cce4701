"""`advcl attack` (not built yet)."""

from __future__ import annotations

from ..errors import NotImplementedYet


def attack() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("attack")
