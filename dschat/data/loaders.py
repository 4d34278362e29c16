"""DataLoaders over this rank's shard of a dataset."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, DistributedSampler

from dschat.runtime import dist


def make_loader(dataset, collator, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader over this rank's shard (DistributedSampler, seeded; keeps the tail when evaluating)."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=shuffle,
                                 seed=seed, drop_last=shuffle)
    # Its own generator: starting an epoch (iter) would otherwise draw from the global torch RNG, and a
    # resumed run, which restores that RNG and then starts its epoch, would drift from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    """Optimizer steps in one pass over `loader`."""
    return math.ceil(len(loader) / grad_accum)
