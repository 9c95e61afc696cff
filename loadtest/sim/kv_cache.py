"""SimKVCache: a simulated worker's paged KV cache — block bookkeeping and KV events, no tensors.

It keeps the real engine's semantics (services/engine/block_pool.py and kv_cache_manager.py), so
the gateway's prefix index sees what it would see from a real worker:

    blocks:     ref counts and hashes, one entry per block id 0 … num_blocks-1
    free list:  LRU → [fresh blocks never used …][5][2][4] ← MRU    blocks with ref count 0
    cached:     {block hash: block id}   full blocks whose KV is computed; a freed block keeps
                its hash and stays hittable until the LRU end hands it out again (then `removed`)

Request level (vLLM v1's interface): `get_computed_blocks` → the longest cached prefix (at least
one token is left to compute), `allocate_slots` → grow a request or return False changing nothing,
`cache_computed_blocks` → publish the full blocks whose KV is now computed (`stored`, with the
parent hash), `free` → give the blocks back tail first, so a sequence's prefix is evicted last.

Blocks never handed out are a counter, not free-list entries, so a thousand simulated workers cost
memory only for the blocks they have used (they sit at the LRU end, as in the real pool). Stored
events that continue the previous one's chain are merged into one `stored` (a chain, first to
last), which the protocol allows and which keeps event batches small. Event-loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from kvtransfer.block_hash import hash_blocks, root_hash


@dataclass(frozen=True)
class KVEvent:
    """The engine's event shape (services.common.kv_event_log.KVEventLog.append reads it)."""

    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None  # stored: the hash before the first block (the root for block 0)


class CacheUser(Protocol):
    """What the cache reads and writes on a request (loadtest.sim.request.SimRequest)."""

    block_ids: list[int]
    block_hashes: list[int]
    num_computed_tokens: int
    num_published_blocks: int
    cache_salt: str | None

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> list[int]: ...


class SimKVCache:
    def __init__(self, num_blocks: int, block_size: int, model_id: str):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size, self.model_id = num_blocks, block_size, model_id
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._next_fresh = 0  # blocks [_next_fresh, num_blocks) were never handed out
        self._free: OrderedDict[int, None] = OrderedDict()  # used before, ref count 0; LRU first
        self._cached: dict[int, int] = {}
        self._events: list[list] = []  # [kind, [hashes], parent] while pending; merged chains
        self._roots: dict[str | None, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # of which found cached

    # ---- block level ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._next_fresh + len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a hash, in use or free (what the gateway's index should say we hold)."""
        return len(self._cached)

    def held_hashes(self) -> set[int]:
        """A copy of every cached block hash. Does not mutate."""
        return set(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` blocks from the LRU end, or None (nothing taken) if fewer are free. Mutates:
        an evicted block loses its hash (`removed`)."""
        if n > self.num_free_blocks:
            return None
        ids, removed = [], []
        for _ in range(n):
            if self._next_fresh < self.num_blocks:
                block_id = self._next_fresh
                self._next_fresh += 1
            else:
                block_id, _ = self._free.popitem(last=False)
                h = self._hash[block_id]
                if h is not None:
                    if self._cached.get(h) == block_id:
                        del self._cached[h]
                        removed.append(h)
                    self._hash[block_id] = None
            self._ref[block_id] = 1
            ids.append(block_id)
        if removed:
            self._emit("removed", removed, None)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference on each block (cache hits, pins); revives free ones. Mutates."""
        for block_id in block_ids:
            if self._ref[block_id] == 0:
                del self._free[block_id]
            self._ref[block_id] += 1

    def free_blocks(self, block_ids: list[int]) -> None:
        """Drop one reference from each, in order; blocks at zero join the MRU end. Mutates."""
        for block_id in block_ids:
            if self._ref[block_id] <= 0:
                raise AssertionError(f"double free of KV block {block_id}")
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: int, parent_hash: int) -> None:
        """Record that `block_id` holds the computed full block `block_hash` (`stored`). Mutates.
        When another block holds that hash already, the map keeps the first (as the real pool)."""
        if self._hash[block_id] is not None or block_hash in self._cached:
            return
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        self._emit("stored", [block_hash], parent_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (`cleared`); only when no block is in use. Mutates."""
        if self.num_used_blocks:
            return False
        for block_id in self._cached.values():
            self._hash[block_id] = None
        self._cached.clear()
        self._emit("cleared", [], None)
        return True

    def take_events(self) -> list[KVEvent]:
        """The events since the last call, oldest first; forgets them. Mutates."""
        events, self._events = self._events, []
        return [KVEvent(kind, tuple(hashes), parent) for kind, hashes, parent in events]

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def _emit(self, kind: str, hashes: list[int], parent: int | None) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last[0] == kind == "stored" and last[1][-1] == parent:
            last[1].extend(hashes)  # the same chain, one block further
        elif last is not None and last[0] == kind == "removed":
            last[1].extend(hashes)
        else:
            self._events.append([kind, hashes, parent])

    # ---- request level --------------------------------------------------------------------------

    def root(self, cache_salt: str | None) -> int:
        r = self._roots.get(cache_salt)
        if r is None:
            r = self._roots[cache_salt] = root_hash(self.model_id, cache_salt)
        return r

    def _extend_hashes(self, req: CacheUser, num_tokens: int) -> None:
        """Hash the request's full blocks among its first `num_tokens` tokens. Mutates the request."""
        have, want = len(req.block_hashes), num_tokens // self.block_size
        if want <= have:
            return
        parent = req.block_hashes[-1] if have else self.root(req.cache_salt)
        tokens = req.token_ids(have * self.block_size, want * self.block_size)
        req.block_hashes.extend(hash_blocks(tokens, self.block_size, self.model_id, parent_hash=parent))

    def get_computed_blocks(self, req: CacheUser, max_tokens: int | None = None) -> tuple[list[int], int]:
        """Blocks of the longest cached prefix of the request's first `max_tokens` tokens (default:
        all but the last, whose step yields the next token's logits) and the tokens they cover.
        Takes no references; hashes the request's blocks (mutates the request only)."""
        limit = req.num_tokens - 1 if max_tokens is None else max_tokens
        self._extend_hashes(req, limit)
        hits = []
        for h in req.block_hashes[: limit // self.block_size]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_prefix_queries += req.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: CacheUser, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Room for `num_new_tokens` beyond what the request has computed; `computed_blocks` (cache
        hits, for a request holding no blocks yet) are taken first. False, changing nothing, when
        the free blocks do not suffice. Mutates the cache and the request's block_ids."""
        hits = computed_blocks or []
        total = req.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_new_blocks = -(-total // self.block_size) - len(req.block_ids) - len(hits)
        revived = sum(1 for b in hits if self._ref[b] == 0)  # hits on the free list count too
        if max(num_new_blocks, 0) + revived > self.num_free_blocks:
            return False
        if hits:
            self.touch(hits)
            req.block_ids.extend(hits)
        if num_new_blocks > 0:
            req.block_ids.extend(self.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, req: CacheUser) -> None:
        """Publish the request's full blocks whose KV is now computed (`stored`). Mutates."""
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= req.num_published_blocks:
            return
        self._extend_hashes(req, num_full * self.block_size)
        for i in range(req.num_published_blocks, num_full):
            parent = req.block_hashes[i - 1] if i else self.root(req.cache_salt)
            self.cache_block(req.block_ids[i], req.block_hashes[i], parent)
        req.num_published_blocks = num_full

    def free(self, req: CacheUser) -> None:
        """Give back the request's blocks, tail first, and forget them on it. Mutates both."""
        self.free_blocks(req.block_ids[::-1])
        req.block_ids = []
        req.num_published_blocks = 0

    # ---- invariants ----------------------------------------------------------------------------

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise AssertionError if the cache's invariants fail. `expected_refs` (block id → how many
        requests and pins hold it, from the engine) must then equal the ref counts. Does not mutate."""
        for block_id in range(self.num_blocks):
            ref, h = self._ref[block_id], self._hash[block_id]
            assert ref >= 0, f"block {block_id} has ref count {ref}"
            if block_id >= self._next_fresh:
                assert ref == 0 and h is None and block_id not in self._free, f"fresh block {block_id} is in use"
                continue
            in_free = block_id in self._free
            assert in_free == (ref == 0), f"block {block_id}: ref count {ref} but {'on' if in_free else 'off'} the free list"
            if h is not None:
                assert self._cached.get(h) == block_id, f"block {block_id} has hash {h:#x} not mapped to it"
        for h, block_id in self._cached.items():
            assert self._hash[block_id] == h, f"hash {h:#x} maps to block {block_id}, which does not hold it"
        assert 0 <= self.num_free_blocks <= self.num_blocks
        if expected_refs is not None:
            for block_id in range(self._next_fresh):
                want = expected_refs.get(block_id, 0)
                assert self._ref[block_id] == want, f"block {block_id} has ref count {self._ref[block_id]}, but {want} holders"
