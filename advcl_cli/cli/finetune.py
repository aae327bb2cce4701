"""`advcl finetune` (not built yet)."""

from __future__ import annotations

from ..errors import NotImplementedYet


def finetune() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("finetune")
