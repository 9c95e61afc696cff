"""The KV block pool: ref-counted blocks, an LRU free list, and the block-hash → block map.

    blocks:       [0][1][2][3][4][5] ...            every block has a ref count and maybe a hash
    free list:    LRU → [5][2][4] ← MRU             blocks with ref count 0, evicted from the left
    cached:       {hash_a: 2, hash_b: 4, ...}       full blocks whose KV is computed

A freed block keeps its hash and stays in `cached`, so a later request with the same prefix can
take it back off the free list (a prefix-cache hit on a "dead" block). Only when the LRU end of the
free list is handed out for new data does the block lose its hash. Requests free their blocks
tail first, so a sequence's last blocks are evicted before its shared prefix.

Every change to `cached` is recorded as a KV event (stored / removed / cleared) for the gateway's
prefix index; the engine drains them with `take_events()`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class KVEventKind(StrEnum):
    """What happened to cached blocks (a str: events compare and serialise as their value)."""

    STORED = "stored"  # full blocks became prefix cache
    REMOVED = "removed"  # cached blocks were evicted
    CLEARED = "cleared"  # the whole cache was dropped


@dataclass(frozen=True)
class KVEvent:
    kind: KVEventKind
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None  # for "stored": the hash before the first block


@dataclass
class BlockPool:
    num_blocks: int
    blocks: list[Block] = field(init=False)
    _free: OrderedDict[int, None] = field(init=False)
    _cached: dict[int, int] = field(init=False)
    _events: list[KVEvent] = field(init=False)

    def __post_init__(self):
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free = OrderedDict((i, None) for i in range(self.num_blocks))
        self._cached = {}
        self._events = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (ref count 0, cached or not)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def lookup(self, block_hash: int) -> int | None:
        """The block holding this hash's KV, alive or on the free list. Does not mutate."""
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` blocks from the LRU end of the free list, or None (nothing taken) if fewer are free.

        Mutates: evicted blocks lose their hash (a `removed` event each)."""
        if n > len(self._free):
            return None
        ids = []
        removed = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                    removed.append(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        if removed:
            self._events.append(KVEvent(KVEventKind.REMOVED, tuple(removed)))
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cache-hit blocks; revives blocks sitting on the free list. Mutates."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block, in the given order; blocks at zero join the MRU end.

        Callers pass a request's blocks reversed (tail first) so its prefix is evicted last."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise AssertionError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, block_hash: int, parent_hash: int) -> None:
        """Record that `block_id` now holds the full, computed block `block_hash`. Mutates.

        If another block already holds this hash (two requests computed the same prefix at once),
        the map keeps the first; this block stays a private, unhashed copy."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        self._events.append(KVEvent(KVEventKind.STORED, (block_hash,), parent_hash))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use. Mutates."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self._events.append(KVEvent(KVEventKind.CLEARED))
        return True

    def take_events(self) -> list[KVEvent]:
        """Return and forget the events recorded since the last call. Mutates."""
        events, self._events = self._events, []
        return events

    def check_integrity(self) -> None:
        """Raise AssertionError if the pool's invariants do not hold."""
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has ref count {block.ref_count}"
            in_free = block.block_id in self._free
            assert in_free == (block.ref_count == 0), f"block {block.block_id}: ref count {block.ref_count} but {'on' if in_free else 'off'} the free list"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id, f"block {block.block_id} has hash {block.block_hash:#x} not mapped to it"
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, f"hash {block_hash:#x} maps to block {block_id} without it"
        assert len(self._free) <= self.num_blocks
