import pytest

from services.engine.block_pool import BlockPool


def test_allocate_free_and_lru_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert sorted(a + b) == [0, 1, 2, 3]
    assert pool.allocate(1) is None, "does-not-fit returns None, not an exception"
    pool.free(list(reversed(a)))  # tail first: a[1] is evicted before a[0]
    pool.check_integrity()
    assert pool.allocate(1) == [a[1]]
    pool.check_integrity()


def test_freed_block_stays_hittable_until_reused():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.cache(blk, 0xABC, parent_hash=0x1)
    pool.free([blk])
    assert pool.lookup(0xABC) == blk
    pool.touch([blk])  # revive from the free list
    assert pool.blocks[blk].ref_count == 1 and pool.num_free_blocks == 1
    pool.free([blk])
    pool.allocate(2)  # reuse evicts the hash
    assert pool.lookup(0xABC) is None
    pool.check_integrity()


def test_events_record_stored_removed_cleared():
    pool = BlockPool(1)
    (blk,) = pool.allocate(1)
    pool.cache(blk, 7, parent_hash=3)
    pool.free([blk])
    pool.allocate(1)
    pool.free([0])
    assert pool.reset_prefix_cache()
    kinds = [(e.kind, e.block_hashes, e.parent_hash) for e in pool.take_events()]
    assert kinds == [("stored", (7,), 3), ("removed", (7,), None), ("cleared", (), None)]
    assert pool.take_events() == []


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(2)
    x, y = pool.allocate(2)
    pool.cache(x, 5, 0)
    pool.cache(y, 5, 0)
    assert pool.lookup(5) == x and pool.blocks[y].block_hash is None
    pool.check_integrity()


def test_double_free_is_caught():
    pool = BlockPool(1)
    (blk,) = pool.allocate(1)
    pool.free([blk])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([blk])


def test_integrity_check_detects_corruption():
    pool = BlockPool(2)
    pool.allocate(1)
    pool.blocks[0].ref_count = 0  # corrupt: ref 0 but not on the free list
    with pytest.raises(AssertionError):
        pool.check_integrity()
