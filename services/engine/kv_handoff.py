"""What the engine hands out and takes in when a prompt's KV moves between workers.

    prefill engine                                   decode engine
    add_request(handoff=Handoff.prefill())           add_request(handoff=Handoff.import_kv_after(t))
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
class Handoff:
    """How a request continues work done elsewhere (None: an ordinary request). One of:

    Handoff.prefill()          compute the prompt and the first token, then end and pin the KV
    Handoff.resume(tokens)     `tokens` were generated elsewhere (a worker that died mid-stream):
                               recompute the prompt and go on after them
    Handoff.import_kv(first)   the prompt's KV comes from a prefill worker, which sampled `first`:
                               allocate it now and wait for complete_kv_import()
    """

    output_token_ids: tuple[int, ...] = ()
    prefill_only: bool = False
    import_kv: bool = False

    def __post_init__(self):
        if self.prefill_only and (self.import_kv or self.output_token_ids):
            raise ValueError("a prefill-only request starts from its prompt alone (no output tokens, no KV import)")
        if self.import_kv and not self.output_token_ids:
            raise ValueError("import_kv needs the first token the prefill worker sampled (output_token_ids)")

    @classmethod
    def prefill(cls) -> Handoff:
        return cls(prefill_only=True)

    @classmethod
    def resume(cls, output_token_ids) -> Handoff:
        return cls(output_token_ids=tuple(output_token_ids))

    @classmethod
    def import_kv_after(cls, first_token_id: int) -> Handoff:
        return cls(output_token_ids=(first_token_id,), import_kv=True)


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
