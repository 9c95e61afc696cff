"""SimKVCache: the real block pool's semantics (ref counts, LRU free list whose freed blocks stay
hittable, hash only computed full blocks) and the KV events the gateway's prefix index consumes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from gateway.prefix_index import PrefixIndex
from kvtransfer.block_hash import hash_blocks, root_hash
from loadtest.sim.kv_cache import SimKVCache
from services.common.kv_event_log import KVEventLog

BS = 4
MODEL = "sim-test-model"


@dataclass
class Seq:
    """A minimal request for the cache (the CacheUser protocol)."""

    tokens: list[int]
    cache_salt: str | None = None
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_published_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def run_prefill(cache: SimKVCache, seq: Seq) -> int:
    """Admit and fully compute `seq` as the engine would; returns the cached tokens it hit."""
    hits, num_hit = cache.get_computed_blocks(seq)
    assert cache.allocate_slots(seq, seq.num_tokens - num_hit, hits)
    seq.num_computed_tokens = seq.num_tokens
    cache.cache_computed_blocks(seq)
    return num_hit


def test_hashes_are_the_gateways_and_stored_events_chain_from_the_root():
    cache = SimKVCache(16, BS, MODEL)
    tokens = list(range(100, 100 + 3 * BS + 2))  # 3 full blocks and a partial one
    seq = Seq(tokens, cache_salt="s1")
    run_prefill(cache, seq)
    expected = hash_blocks(tokens, BS, MODEL, "s1")
    assert seq.block_hashes == expected
    events = cache.take_events()
    assert [(e.kind, list(e.block_hashes), e.parent_hash) for e in events] == [("stored", expected, root_hash(MODEL, "s1"))]
    assert cache.held_hashes() == set(expected)  # the partial block has no identity
    cache.check_integrity()


def test_prefix_hit_leaves_one_token_to_compute_and_survives_free():
    cache = SimKVCache(16, BS, MODEL)
    a = Seq(list(range(2 * BS)))
    assert run_prefill(cache, a) == 0
    cache.free(a)  # freed blocks keep their hashes: still hittable
    assert cache.num_used_blocks == 0 and cache.num_cached_blocks == 2
    same = Seq(list(range(2 * BS)))
    assert run_prefill(cache, same) == BS, "a full-prompt hit must leave the last block's tokens to compute"
    longer = Seq(list(range(2 * BS)) + [7, 7, 7])
    assert run_prefill(cache, longer) == 2 * BS
    cache.check_integrity()


def test_lru_eviction_emits_removed_for_the_oldest_freed_blocks_tail_first():
    cache = SimKVCache(4, BS, MODEL)
    a = Seq(list(range(2 * BS)))
    run_prefill(cache, a)
    cache.free(a)  # tail first: a's second block is evicted before its first
    cache.take_events()
    b = Seq(list(range(50, 50 + 2 * BS)))
    run_prefill(cache, b)  # takes the 2 never-used blocks: nothing evicted
    assert [e.kind for e in cache.take_events()] == ["stored"]
    c = Seq(list(range(90, 90 + BS)))
    run_prefill(cache, c)  # needs a block: the LRU one is a's tail
    events = cache.take_events()
    assert events[0].kind == "removed" and list(events[0].block_hashes) == [a.block_hashes[1]]
    assert a.block_hashes[0] in cache.held_hashes() and a.block_hashes[1] not in cache.held_hashes()
    cache.check_integrity()


def test_allocate_slots_that_do_not_fit_change_nothing():
    cache = SimKVCache(3, BS, MODEL)
    big = Seq(list(range(4 * BS)))
    before = (cache.num_free_blocks, cache.num_cached_blocks)
    hits, n = cache.get_computed_blocks(big)
    assert not cache.allocate_slots(big, big.num_tokens - n, hits)
    assert big.block_ids == [] and (cache.num_free_blocks, cache.num_cached_blocks) == before
    assert cache.allocate(4) is None
    cache.check_integrity()


def test_double_free_and_wrong_refs_are_caught():
    cache = SimKVCache(4, BS, MODEL)
    ids = cache.allocate(2)
    cache.free_blocks(ids)
    with pytest.raises(AssertionError, match="double free"):
        cache.free_blocks(ids[:1])
    held = cache.allocate(1)
    with pytest.raises(AssertionError, match="holders"):
        cache.check_integrity(expected_refs={})  # the engine claims nobody holds it
    cache.check_integrity(expected_refs={held[0]: 1})


def test_reset_prefix_cache_only_when_idle_and_emits_cleared():
    cache = SimKVCache(8, BS, MODEL)
    seq = Seq(list(range(2 * BS)))
    run_prefill(cache, seq)
    assert not cache.reset_prefix_cache()
    cache.free(seq)
    cache.take_events()
    assert cache.reset_prefix_cache()
    assert [e.kind for e in cache.take_events()] == ["cleared"] and cache.num_cached_blocks == 0
    cache.check_integrity()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_events_replayed_into_the_gateways_index_agree_with_the_cache(seed):
    """A random workload of shared prefixes, decodes growing blocks, frees and evictions: the events,
    through the real KVEventLog into the gateway's PrefixIndex, say exactly which hashes the cache holds."""
    rng = random.Random(seed)
    cache = SimKVCache(24, BS, MODEL)
    log, index = KVEventLog(), PrefixIndex()
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 4) * BS)] for _ in range(4)]
    live: list[Seq] = []
    for _ in range(300):
        if live and (rng.random() < 0.4 or cache.num_free_blocks < 6):
            seq = live.pop(rng.randrange(len(live)))
            cache.free(seq)
        elif live and rng.random() < 0.5:
            seq = rng.choice(live)  # one decode step: the next token's slot, then its KV is computed
            seq.tokens.append(rng.randrange(1000))
            if cache.allocate_slots(seq, 1):
                seq.num_computed_tokens += 1
                cache.cache_computed_blocks(seq)
            else:
                seq.tokens.pop()
        else:
            seq = Seq(rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 2 * BS))], cache_salt=rng.choice([None, "x"]))
            hits, n = cache.get_computed_blocks(seq)
            if cache.allocate_slots(seq, seq.num_tokens - n, hits):
                seq.num_computed_tokens = seq.num_tokens
                cache.cache_computed_blocks(seq)
                live.append(seq)
        refs: dict[int, int] = {}
        for s in live:
            for b in s.block_ids:
                refs[b] = refs.get(b, 0) + 1
        cache.check_integrity(expected_refs=refs)
        batch = log.append(cache.take_events())
        if batch is not None:
            assert index.apply("w", batch)
        assert log.held == cache.held_hashes()
    assert index.held("w") == cache.held_hashes()
    index.check_integrity()
    log.check_integrity()
