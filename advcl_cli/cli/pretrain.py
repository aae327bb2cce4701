"""`advcl pretrain` (not built yet)."""

from __future__ import annotations

from ..errors import NotImplementedYet


def pretrain() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("pretrain")


def import_checkpoint() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("import")
