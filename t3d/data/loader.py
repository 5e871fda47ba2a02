"""Batching: a collate function that drops (and counts) skipped videos, and a deterministic DataLoader."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import SkippedSample

__all__ = ["collate_clips", "make_loader", "seed_worker"]


def collate_clips(samples: Sequence[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Stack the usable samples; count the skipped ones.

    Returns {"clips": (N, 3, T, H, W) (test mode: (N, K, 3, T, H, W)) or None when N == 0, "labels": (N,) int64,
    "indices": (N,) int64, "count": N, "skipped": number of skipped videos, "skipped_paths": [...]}.
    """
    good = [s for s in samples if not isinstance(s, SkippedSample)]
    skipped = [s.path for s in samples if isinstance(s, SkippedSample)]
    return {
        "clips": torch.stack([s["clip"] for s in good]) if good else None,
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "count": len(good),
        "skipped": len(skipped),
        "skipped_paths": skipped,
    }


def seed_worker(worker_id: int) -> None:
    """Seed numpy and python in a worker from the torch seed the DataLoader gave it (deterministic given the
    loader's generator). Clip sampling itself uses per-sample seeds, so this only guards third-party code."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | None = None,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with :func:`collate_clips`, its own seeded generator (so iterating never draws from the global
    torch RNG: resume stays exact) and seeded workers. ``drop_last`` defaults to True with a sampler (training)
    and False without (evaluation, dataset order)."""
    if workers < 0:
        raise ValueError(f"--workers: expected an integer >= 0, got {workers}")
    drop_last = (sampler is not None) if drop_last is None else drop_last
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_clips,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
