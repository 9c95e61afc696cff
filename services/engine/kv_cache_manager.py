"""The request-level view of the KV cache: which blocks a request may reuse, which it must allocate,
and when its full blocks become shareable.

    request tokens: |■■■■|■■■■|■■■■|■■··|      block_size = 4, 14 tokens
    block_ids:       [7]  [2]  [9]  [4]
    block_hashes:    h0   h1   h2              only full blocks are hashed (and only once computed)

Interface (after vLLM v1's kv_cache_manager): `get_computed_blocks` finds the longest cached
prefix, `allocate_slots` grows a request to hold more tokens or returns False with nothing
changed, `cache_computed_blocks` publishes blocks whose KV the last step completed, `free` gives
everything back tail first.
"""

from __future__ import annotations

from kvtransfer.block_hash import hash_blocks, root_hash

from .block_pool import BlockPool, KVEvent
from .request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, model_id: str, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # of which served from cache

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        """Hash every full block among the request's first `num_tokens` tokens not hashed yet. Mutates the request."""
        have = len(request.block_hashes)
        want = num_tokens // self.block_size
        if want <= have:
            return
        parent = request.block_hashes[-1] if have else root_hash(self.model_id, request.cache_salt)
        tokens = request.all_token_ids[have * self.block_size : want * self.block_size]
        request.block_hashes.extend(hash_blocks(tokens, self.block_size, self.model_id, parent_hash=parent))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Blocks of the longest cached prefix and the number of tokens they cover. Does not take references.

        At least one token is always left to compute: the step that computes it produces the logits
        for the next token."""
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_tokens = request.num_tokens - 1
        self._extend_hashes(request, max_hit_tokens)
        hits: list[int] = []
        for block_hash in request.block_hashes[: max_hit_tokens // self.block_size]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens beyond what the request has computed.

        `computed_blocks` (from get_computed_blocks, for a request not yet holding blocks) are taken
        first. Returns False, changing nothing, when the pool cannot supply the rest."""
        computed_blocks = computed_blocks or []
        total_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        blocks_needed = -(-total_tokens // self.block_size)
        num_new_blocks = blocks_needed - len(request.block_ids) - len(computed_blocks)
        # revived cache hits sitting on the free list count against the free blocks too
        revived = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_count == 0)
        if num_new_blocks + revived > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            request.block_ids.extend(computed_blocks)
        if num_new_blocks > 0:
            new_ids = self.pool.allocate(num_new_blocks)
            assert new_ids is not None
            request.block_ids.extend(new_ids)
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the full blocks whose KV is now computed, so other requests can hit them. Mutates."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        self._extend_hashes(request, num_full * self.block_size)
        root = None
        for i in range(request.num_published_blocks, num_full):
            block_id = request.block_ids[i]
            if self.pool.blocks[block_id].block_hash is not None:
                continue
            if i:
                parent = request.block_hashes[i - 1]
            else:
                root = root if root is not None else root_hash(self.model_id, request.cache_salt)
                parent = root
            self.pool.cache(block_id, request.block_hashes[i], parent)
        request.num_published_blocks = max(request.num_published_blocks, num_full)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, and forget them on the request. Mutates both."""
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_published_blocks = 0

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
