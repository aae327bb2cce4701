"""Pretraining methods, one file each; the losses are pure functions in ``losses.py``.

A method is a class built as ``Method(settings, n_images=N, device=D)`` from a
``PretrainSettings``. It has ``name``, ``eps`` (the attack budget, None for a non-robust
method), ``notes`` (lines the engine shows on stderr), ``model_config(arch)`` (the
``ModelConfig`` fields of the network it trains) and
``step(model, batch_uint8, indices, gen, ctx) -> (loss, terms)``: the full training loss of one
batch (views, attacks, loss) and its parts as detached tensors. The engine does the rest.
"""

from __future__ import annotations

from ..errors import UsageError
from .advcl import AdvCL
from .simclr import SimCLR

METHODS = {"advcl": AdvCL, "simclr": SimCLR}


def get_method(name: str):
    """The method class called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'", f"choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "AdvCL", "SimCLR", "get_method"]
