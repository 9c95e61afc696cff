"""Prefix affinity: the share of the prompt's blocks a worker already holds as a leading run.

Precise, from the gateway's prefix index (fed by the workers' own KV events): the longest run of
the prompt's consecutive blocks, from the first, that the worker holds. A hole ends the run,
because a worker can only reuse a cached prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..prefix_index import PrefixIndex
from .base import RequestContext


class PrefixAffinityScorer:
    name = "prefix-affinity"
    needs_block_hashes = True  # the request context must carry the prompt's block hashes

    def __init__(self, index: PrefixIndex):
        self.index = index

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        if not ctx.block_hashes:
            return [0.0] * len(candidates)
        held = ctx.held_blocks(self.index, candidates)
        return [held.get(c.worker_id, 0) / len(ctx.block_hashes) for c in candidates]
