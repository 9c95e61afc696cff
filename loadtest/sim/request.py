"""What a simulated request is, inside the engine and on its way out: the request's state
(SimRequest), its outputs (SimOutput, SimImport for a KV import, PinnedBlocks for a prefill's
handed-over blocks) and the engine's load (SimStats). Plain data; only SimRequest.next_token and
the engine mutate them.

    tokens:  |prompt ……………………………………|outputs…|      num_computed_tokens ≤ num_tokens
    blocks:  [b0][b1][b2][b3][b4]                   block_hashes: the full ones, chained
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass, field

WAITING, RUNNING, IMPORTING, FINISHED = "waiting", "running", "importing", "finished"
FIRST_TOKEN_ID = 256  # outputs avoid the low ids, where models keep their special tokens


@dataclass(frozen=True)
class SimStats:
    num_running: int
    num_waiting: int  # queued, preempted, or waiting for its imported KV
    num_used_blocks: int
    num_total_blocks: int
    num_pending_prefill_tokens: int  # prompt tokens of waiting and running requests not computed yet

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks


@dataclass(frozen=True)
class PinnedBlocks:
    """A finished prefill's prompt blocks, held (ref count + 1) until release_pinned()."""

    request_id: str
    block_ids: tuple[int, ...]  # in prompt order; the last may be partial
    block_hashes: tuple[int, ...]  # chained hashes of the full blocks
    num_tokens: int


@dataclass(frozen=True)
class SimImport:
    """Where an import_kv request's prompt KV goes: blocks before `first_missing_block` came from
    this engine's prefix cache; the rest must be pulled. `recompute`: no room, computed here."""

    request_id: str
    block_ids: tuple[int, ...]
    num_cached_tokens: int
    block_size: int
    recompute: bool = False
    finished = False  # a stream item that does not end the stream

    @property
    def first_missing_block(self) -> int:
        return self.num_cached_tokens // self.block_size

    @property
    def num_missing_blocks(self) -> int:
        return len(self.block_ids) - self.first_missing_block


@dataclass
class SimOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running (and for a pinned prefill)
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    pinned: PinnedBlocks | None = None


@dataclass(eq=False)
class SimRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    cache_salt: str | None
    stop_token_ids: frozenset[int]
    prefill_only: bool
    queue: asyncio.Queue
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_published_blocks: int = 0
    num_cached_tokens: int | None = None  # prompt tokens from the prefix cache at first schedule; None = not yet
    num_preemptions: int = 0
    state: str = WAITING
    finish_reason: str | None = None
    stop_token_id: int | None = None
    pinned: PinnedBlocks | None = None  # a prefill_only request's prompt blocks, once pinned
    _rng: random.Random | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        if end <= len(self.prompt_token_ids):
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    def next_token(self, vocab_size: int) -> int:
        """The next output id: the request id's pseudo-random sequence, skipping tokens that came
        from elsewhere (a prefill worker's first token). Mutates the generator."""
        if self._rng is None:
            seed = int.from_bytes(hashlib.blake2b(self.request_id.encode(), digest_size=8).digest(), "little")
            self._rng = random.Random(seed)
            for _ in self.output_token_ids:
                self._rng.randrange(FIRST_TOKEN_ID, vocab_size)
        return self._rng.randrange(FIRST_TOKEN_ID, vocab_size)
