import pytest

from glmserve.engine.block_pool import BlockPool, NoFreeBlocks
from glmserve.prefix_hash import chain_hashes, extend_chain, hash_block


def test_hash_chain_depends_on_whole_prefix():
    a = chain_hashes(list(range(8)), 4)
    b = chain_hashes([99] + list(range(1, 8)), 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same 2nd block content, different parent
    assert extend_chain(a[:1], list(range(8)), 4) == a
    assert hash_block(0, [1, 2]) == hash_block(0, [1, 2]) != hash_block(0, [2, 1])


def test_allocate_free_and_exhaustion():
    pool = BlockPool(4, 2)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3 and pool.num_free == 1 and pool.usage == 0.75
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    pool.free(ids)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.free(ids[:1])


def test_prefix_hit_refcount_and_lru_eviction():
    pool = BlockPool(3, 2)
    toks = [1, 2, 3, 4]
    hashes = chain_hashes(toks, 2)
    ids = pool.allocate(2)
    pool.register_full_blocks(ids, hashes)
    # Shared while the owner still holds it.
    hit = pool.match_prefix(hashes, 2)
    assert hit == ids and pool.num_free == 1
    pool.free(hit)
    pool.free(ids)
    assert pool.num_free == 3
    # Freed but cached: still found.
    assert pool.match_prefix(hashes, 2) == ids
    pool.free(ids)
    # Allocating everything evicts the cached content.
    pool.allocate(3)
    assert pool.match_prefix(hashes, 2) == []


def test_prefix_caching_disabled_never_hits():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    hashes = chain_hashes([1, 2, 3, 4], 2)
    ids = pool.allocate(2)
    pool.register_full_blocks(ids, hashes)
    assert pool.match_prefix(hashes, 2) == []


def test_kv_events_are_net_deltas_then_snapshots_when_behind():
    pool = BlockPool(2, 2)
    log = pool.events
    hashes = chain_hashes([1, 2, 3, 4], 2)
    first = log.since(0, 0)  # unknown epoch: snapshot
    assert first.reset and first.stored == [] and first.epoch == log.epoch
    ids = pool.allocate(2)
    pool.register_full_blocks(ids, hashes)
    delta = log.since(first.epoch, first.seq)
    assert not delta.reset and sorted(delta.stored) == sorted(hashes) and delta.removed == []
    assert log.since(delta.epoch, delta.seq).stored == []  # nothing new
    pool.free(ids)
    pool.allocate(1)  # evicts the least recently freed block: the tail block, hashes[1]
    evicted = log.since(delta.epoch, delta.seq)
    assert evicted.removed == [hashes[1]] and evicted.stored == []
    # A hash stored then removed within one window nets out as removed only.
    both = log.since(first.epoch, first.seq)
    assert both.stored == [hashes[0]] and both.removed == [hashes[1]]


def test_kv_events_snapshot_after_the_log_wraps():
    pool = BlockPool(1, 1)  # a log of 4 events
    for t in range(6):
        pool.register_full_blocks(pool.allocate(1), chain_hashes([t], 1))
        pool.free([0])
    behind = pool.events.since(pool.events.epoch, 1)
    assert behind.reset and behind.stored == chain_hashes([5], 1)
    assert pool.events.since(pool.events.epoch + 1, pool.events.seq).reset  # a restarted worker


def test_a_freed_requests_blocks_come_back_as_one_ascending_run():
    """Free puts a request's blocks in the queue tail first; allocate still hands them out ascending, so
    the next request's blocks are consecutive (the KV link sends such runs without gathering)."""
    pool = BlockPool(8, 2)
    first = pool.allocate(5)
    pool.allocate(3)
    pool.free(first)  # queued 4, 3, 2, 1, 0
    assert first == pool.allocate(5) == [0, 1, 2, 3, 4]
