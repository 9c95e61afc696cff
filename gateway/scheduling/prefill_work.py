"""Prefill work: which prefill worker finishes this prompt soonest — its own prefix hits and its
backlog, in one unit (prompt tokens to compute before this prompt is done).

    work(w) = backlog(w) + uncached(w)       backlog: prompt tokens queued there, not yet computed
                                             uncached: this prompt's tokens past w's cached prefix
    score   = 1 − work / (queue limit + prompt length), in [0, 1]

Counting both in tokens makes the trade explicit: a worker holding 60 of a prompt's 64 blocks but
7,000 tokens behind loses to an idle one that must compute all 1,024. The backlog is the larger of
what the worker reported (num_pending_prefill_tokens) and the prompt tokens this gateway has sent
it since, counted at decision time, so a burst of long prompts spreads over the prefill workers.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..prefix_index import PrefixIndex
from .base import RequestContext


def pending_prefill_tokens(handle) -> int:
    """The larger of the worker's reported backlog and this gateway's in-flight prompt tokens."""
    reported = handle.load.num_pending_prefill_tokens if handle.load is not None else 0
    return max(reported, handle.num_in_flight_tokens)


class PrefillWorkScorer:
    name = "prefill-work"

    def __init__(self, index: PrefixIndex, max_pending_tokens: int):
        if max_pending_tokens < 1:
            raise ValueError(f"max_pending_tokens must be >= 1, got {max_pending_tokens}")
        self.index = index
        self.max_pending_tokens = max_pending_tokens

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        held = self.index.match(ctx.block_hashes, [c.worker_id for c in candidates]) if ctx.block_hashes else {}
        scale = self.max_pending_tokens + max(ctx.num_prompt_tokens, 1)
        scores = []
        for c in candidates:
            uncached = ctx.num_prompt_tokens - held.get(c.worker_id, 0) * ctx.block_size
            scores.append(max(0.0, 1.0 - (pending_prefill_tokens(c) + uncached) / scale))
        return scores
