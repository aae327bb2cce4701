"""Mini-batches of an on-device ImageData, shuffled by (seed, epoch) and split across ranks."""

from __future__ import annotations

import torch

from advcl_cli.data.registry import ImageData
from advcl_cli.errors import DataError


class Batches:
    """Shuffled mini-batches of an ImageData already on the target device.

    ``batch_size`` is the global batch. Rank ``r`` of ``world_size`` ranks takes positions
    ``[r*b//W, (r+1)*b//W)`` of every global batch of size ``b``, so the ranks' batches joined in
    rank order are exactly the single-process batch. The order is a function of (seed, epoch)
    only: call ``set_epoch`` before iterating; iterating twice gives the same batches.
    With ``drop_last=False`` the last, smaller batch is kept and split as evenly as possible
    (a rank may then get an empty batch; every rank yields the same number of batches).
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        n = len(data)
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}", "pass a positive --batch-size")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size} processes", "check the torchrun settings")
        if batch_size % world_size:
            raise DataError(
                f"batch size {batch_size} does not divide by {world_size} processes",
                f"use a --batch-size that is a multiple of {world_size}",
            )
        if drop_last and n < batch_size:
            raise DataError(
                f"dataset {data.name!r} has {n} images, fewer than one batch of {batch_size}",
                f"use a smaller --batch-size (at most {n})",
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self) -> torch.Tensor:
        """This epoch's permutation of all indices (the same on every rank), on the data's device."""
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        return perm.to(self.data.images.device)

    def __iter__(self):
        perm, n, b, w, r = self.order(), len(self.data), self.batch_size, self.world_size, self.rank
        for i in range(len(self)):
            size = min(b, n - i * b)
            start = i * b + r * size // w
            stop = i * b + (r + 1) * size // w
            idx = perm[start:stop]
            yield self.data.images[idx], self.data.labels[idx], idx
