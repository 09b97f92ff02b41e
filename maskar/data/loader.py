"""DataLoader construction: one seeded, epoch-aware sampler for single-process and DDP runs."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from that seed
    # so any numpy-based augmentation is reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    distributed: bool | None = None,
) -> DataLoader:
    """A DataLoader whose sampler is always a :class:`DistributedSampler`.

    ``batch_size`` is per process. ``distributed=None`` means "if torch.distributed is
    initialised"; otherwise the sampler runs with one replica, so shuffling is the same
    seed-plus-epoch permutation either way. Call :func:`set_epoch` (or
    ``loader.sampler.set_epoch``) before each epoch to reshuffle; a resumed run that sets the
    same epoch sees the same order. With workers, their RNGs (random flips) derive from ``seed``
    and the rank; with ``num_workers=0`` flips use the process's torch RNG.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        replicas, rank = 1, 0
    if len(dataset) < replicas or (drop_last and len(dataset) < batch_size * replicas):
        raise ValueError(
            f"dataset has {len(dataset)} samples, fewer than one batch ({batch_size} x {replicas} ranks); "
            f"lower train.batch_size or use more data"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    generator = torch.Generator().manual_seed(seed * 1000 + rank)  # drives worker seeds (h-flips)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle ``loader`` for ``epoch`` (no-op for samplers without ``set_epoch``)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
