"""DataLoaders over this rank's shard of a dataset, optionally in length-grouped batches."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from dschat.runtime import dist

MEGA_BATCHES = 50  # --group_by_length sorts windows of this many batches (Hugging Face's LengthGroupedSampler's)


def row_lengths(dataset) -> list[int]:
    """Tokens each row pads to in a batch: the longest of its token-id columns (names ending in "ids")."""
    columns = [c for c in dataset.column_names if c.endswith("ids")]
    if not columns:
        raise ValueError(f"no token-id column (name ending in 'ids') among {dataset.column_names}")
    per_column = [[len(ids) for ids in dataset[c]] for c in columns]
    return [max(lens) for lens in zip(*per_column)]


def length_grouped(indices: Sequence[int], lengths: Sequence[int], batch_size: int, rng: random.Random,
                   mega_batches: int = MEGA_BATCHES) -> list[int]:
    """`indices` reordered so each run of `batch_size` holds rows of similar length.

    Windows of `mega_batches` batches (in the given order) are sorted by length, longest first, cut into
    batches, and those batches shuffled with `rng`; a partial last batch stays last. Every index is kept.
    """
    window = batch_size * mega_batches
    out: list[int] = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start: start + window], key=lambda i: -lengths[i])
        batches = [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
        tail = batches.pop() if len(batches[-1]) < batch_size else None
        rng.shuffle(batches)
        out += [i for b in batches + ([tail] if tail else []) for i in b]
    return out


class LengthGroupedSampler(Sampler[int]):
    """This rank's DistributedSampler shard, reordered by length_grouped (seeded by seed and epoch)."""

    def __init__(self, base: DistributedSampler, lengths: Sequence[int], batch_size: int, seed: int):
        self.base, self.lengths, self.batch_size, self.seed = base, lengths, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (a new shuffle, as DistributedSampler.set_epoch)."""
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        return iter(length_grouped(list(self.base), self.lengths, self.batch_size, rng))

    def __len__(self) -> int:
        return len(self.base)


def make_loader(dataset, collator, batch_size: int, shuffle: bool, seed: int,
                group_by_length: bool = False) -> DataLoader:
    """A DataLoader over this rank's shard (DistributedSampler, seeded; keeps the tail when evaluating);
    group_by_length: batches of rows of similar length (less padding), see length_grouped."""
    sampler: Sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(),
                                          shuffle=shuffle, seed=seed, drop_last=shuffle)
    if group_by_length:
        sampler = LengthGroupedSampler(sampler, row_lengths(dataset), batch_size, seed)
    # Its own generator: starting an epoch (iter) would otherwise draw from the global torch RNG, and a
    # resumed run, which restores that RNG and then starts its epoch, would drift from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    """Optimizer steps in one pass over `loader`."""
    return math.ceil(len(loader) / grad_accum)
