"""Mini-batches of an on-device ImageData, shuffled as a function of (seed, epoch) only."""

from __future__ import annotations

import torch

from advcl_cli.data.registry import ImageData
from advcl_cli.errors import DataError


class Batches:
    """Shuffled mini-batches of an ImageData already on the target device.

    The order is a function of (seed, epoch) only: call ``set_epoch`` before iterating;
    iterating twice gives the same batches, so a resumed run, and every rank of a torchrun job
    (each then keeps its slice of the global batch, distributed.local_slice), sees the
    same ones. With ``drop_last=False`` the last, smaller batch is kept, unless it has fewer
    than ``min_last`` images or does not divide into ``ranks`` equal shares: then it is dropped.
    Fewer images than one batch are an error with ``drop_last`` or ``require_full``.
    ``use(positions)`` restricts the batches to those images of ``data`` (RCS's coreset; the
    indices yielded stay positions in ``data``).
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        ranks: int = 1,
        min_last: int = 1,
        require_full: bool | None = None,
    ):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}", "pass a positive --batch-size")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle = shuffle
        self.rules = (drop_last, ranks, min_last, drop_last if require_full is None else require_full)
        self.epoch = 0
        self.use(None)

    def use(self, positions: torch.Tensor | None) -> None:
        """Batch only the images at ``positions`` of the data (None: all of them)."""
        self.positions = None if positions is None else positions.to(self.data.images.device)
        n = len(self.data) if positions is None else len(positions)
        drop_last, ranks, min_last, require_full = self.rules
        if require_full and n < self.batch_size:
            raise DataError(
                f"dataset {self.data.name!r} has {n} images, fewer than one batch of {self.batch_size}",
                f"use a smaller --batch-size (at most {n})",
            )
        rest = n % self.batch_size
        self.n = n
        self.drop_last = drop_last or (rest > 0 and (rest < min_last or rest % ranks != 0))
        if len(self) == 0:
            raise DataError(
                f"dataset {self.data.name!r} has {n} images: no batch of at least {min_last} that divides among {ranks} processes",
                "use more images (--limit) or fewer processes",
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.n, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self) -> torch.Tensor:
        """This epoch's permutation of the images' positions, on the data's device."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        perm = perm.to(self.data.images.device)
        return perm if self.positions is None else self.positions[perm]

    def __iter__(self):
        return self.from_step(0)

    def from_step(self, first: int):
        """This epoch's batches from the ``first``-th on (0-based: a run resumed mid-epoch)."""
        perm, b = self.order(), self.batch_size
        for i in range(first, len(self)):
            idx = perm[i * b : (i + 1) * b]
            yield self.data.images[idx], self.data.labels[idx], idx
