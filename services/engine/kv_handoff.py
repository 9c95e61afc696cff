"""What the engine hands out and takes in when a prompt's KV moves between workers.

    prefill engine                                   decode engine
    add_request(prefill_only=True)                   add_request(output_token_ids=[t], import_kv=True)
      → first token t, blocks pinned: PinnedKV         → KVImport: local blocks to fill, the rest cached
    release_pinned(id) after the pull / lease end      complete_kv_import(id, ok) → decode continues
                                                       (ok=False: recompute the prompt locally)

The bytes move outside the engine (kvtransfer/): pinned blocks cannot be evicted or reused, and
blocks of a pending import belong to that request alone, so another thread may read or write them
while the engine thread runs other requests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PinnedKV:
    """A finished prefill's KV blocks, held (ref count +1) until release_pinned()."""

    request_id: str
    block_ids: tuple[int, ...]  # in prompt order; the last may be partial
    block_hashes: tuple[int, ...]  # chained hashes of the full blocks
    num_tokens: int  # prompt tokens whose KV the blocks hold


@dataclass(frozen=True)
class KVImport:
    """Where a request's prompt KV must be written before it can decode.

    The request holds `block_ids` for its whole prompt; the first `num_cached_tokens` tokens
    (whole blocks) came from this engine's own prefix cache, so only blocks from
    `first_missing_block` on must be filled from the prefill worker."""

    request_id: str
    block_ids: tuple[int, ...]
    num_cached_tokens: int
    block_size: int
    recompute: bool = False  # no room for the import: the engine computes the prompt itself
    finished: bool = False  # a stream item that does not end the stream

    @property
    def first_missing_block(self) -> int:
        return self.num_cached_tokens // self.block_size

    @property
    def missing_block_ids(self) -> tuple[int, ...]:
        return self.block_ids[self.first_missing_block :]
