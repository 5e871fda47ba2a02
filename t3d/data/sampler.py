"""Deterministic, resumable, distributed-aware sampling of training data."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random choices (clip start, crop, flip) in one epoch.

    Depends only on (seed, epoch, index), never on worker ids, prefetching or where a run was resumed, so the
    same sample gets the same augmentation in an interrupted-and-resumed run as in an uninterrupted one.
    """
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index * 2_654_435_761) & _MASK


class EpochSampler(Sampler):
    """Shuffled order seeded by (seed, epoch), sharded per global batch, restartable at a batch position.

    Yields ``(index, sample_seed)`` pairs (the datasets of :mod:`t3d.data` accept them). For distributed training
    with ``world_size`` processes and a per-process ``batch_size`` B, global batch j is
    ``order[j*B*W:(j+1)*B*W]`` and rank r takes its r-th slice of B samples: W processes see exactly the samples
    one process with batch B*W sees, in the same order.

    Use with ``DataLoader(dataset, batch_size=B, sampler=sampler, drop_last=True)``; call
    :meth:`set_epoch` ``(epoch, start_batch)`` before each epoch (``start_batch``: batches already consumed when
    resuming mid-epoch).

    Args:
        num_samples: length of the dataset.
        batch_size: per-process batch size B.
        seed: base seed of the order and of the per-sample seeds.
        shuffle: False keeps the dataset order (per-sample seeds still vary by epoch).
        rank, world_size: this process and the number of processes.
        drop_last: drop the last incomplete global batch (training: keeps every step's batch size).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples: expected a non-empty dataset, got {num_samples} samples")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        global_batch = batch_size * world_size
        if drop_last and num_samples < global_batch:
            raise ValueError(
                f"batch_size: the global batch ({batch_size} x {world_size} processes = {global_batch}) is larger "
                f"than the dataset ({num_samples} samples); use a smaller --batch-size"
            )
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch for each process (the same on every rank)."""
        gb = self.batch_size * self.world_size
        return self.num_samples // gb if self.drop_last else -(-self.num_samples // gb)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch: expected 0..{self.batches_per_epoch}, got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self, epoch: int) -> list[int]:
        """The whole dataset order of ``epoch`` (before sharding)."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & _MASK)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        b, gb = self.batch_size, self.batch_size * self.world_size
        for j in range(self.start_batch, self.batches_per_epoch):
            start = j * gb + self.rank * b
            for index in order[start : min(start + b, self.num_samples)]:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        # samples this rank yields from start_batch on (the last batch may be partial when not drop_last)
        b, gb = self.batch_size, self.batch_size * self.world_size
        starts = (j * gb + self.rank * b for j in range(self.start_batch, self.batches_per_epoch))
        return sum(max(0, min(s + b, self.num_samples) - s) for s in starts)
