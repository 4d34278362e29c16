"""Rank helpers that need no process group."""

from __future__ import annotations

import pytest

from dschat.runtime import dist


@pytest.mark.parametrize("world,items,expected", [
    (1, [1, 2, 3], [([1, 2, 3], 3)]),
    (2, [1, 2, 3], [([1, 2], 2), ([3, 1], 1)]),
    (3, [1, 2, 3, 4], [([1, 2], 2), ([3, 4], 2), ([1, 2], 0)]),
])
def test_shard_gives_equal_shares_and_counts_real_items(monkeypatch, world, items, expected):
    monkeypatch.setattr(dist, "world_size", lambda: world)
    for r, want in enumerate(expected):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        assert dist.shard(items) == want
