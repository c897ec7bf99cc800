import pytest

from glmserve.engine.block_pool import BlockPool, NoFreeBlocks, chain_hashes, hash_block


def test_hash_chain_depends_on_whole_prefix():
    a = chain_hashes(list(range(8)), 4)
    b = chain_hashes([99] + list(range(1, 8)), 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same 2nd block content, different parent
    assert chain_hashes(list(range(8)), 4, a[:1]) == a
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
