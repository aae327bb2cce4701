"""`advcl eval` (not built yet)."""

from __future__ import annotations

from ..errors import NotImplementedYet


def evaluate() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("eval")
