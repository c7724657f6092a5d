"""lora_studio/engine/dist.py: how one optimizer step's batch is split over ranks and micro-batches."""

from __future__ import annotations

from lora_studio.engine.dist import DistEnv, shard_batch, split_evenly


def test_shards_cover_the_batch_once():
    ids = list(range(11))
    for world in (1, 2, 3):
        for accum in (1, 2, 4):
            seen = []
            for rank in range(world):
                chunks = shard_batch(ids, DistEnv(rank, world), accum)
                assert all(chunks) and len(chunks) <= accum
                seen += [i for c in chunks for i in c]
            assert sorted(seen) == ids


def test_split_evenly_sizes_differ_by_at_most_one():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 3) == [[1], [], []]
