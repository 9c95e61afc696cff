"""Prefill work: which worker computes this prompt's first token soonest — its own prefix hits and
its backlog, in one unit (prompt tokens to compute before this prompt is done).

    work(w) = backlog(w) + uncached(w)       backlog: prompt tokens queued there, not yet computed
                                             uncached: this prompt's tokens past w's cached prefix
    score   = 1 − work / (queue limit + prompt length)     prefill workers (a fixed scale: the limit)
            = 1 − work / max(the largest work of the candidates, min_scale)   decode workers

For decode workers the scale follows the candidates (so the score keeps ranking under any load)
but never drops below `min_scale` tokens (default 2,048, one engine step's token budget): a full
hit on a 64-token prompt saves little and must not outweigh a queue, a 2,000-token one saves a lot.

A worker computes its queued prompt tokens in order (chunked prefill, one token budget per step),
so work(w) is roughly the time to this request's first token on w, and a prefix hit and a queue
are weighed in the same unit: a hit of 2,000 tokens is worth 2,000 tokens of someone else's
prompts queued ahead, no more.

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
    needs_block_hashes = True  # the request context must carry the prompt's block hashes

    def __init__(self, index: PrefixIndex, max_pending_tokens: int | None = None, min_scale: int = 2048):
        """`max_pending_tokens`: the fixed scale (a prefill worker's queue limit); None: relative
        to the candidates, at least `min_scale` tokens."""
        if max_pending_tokens is not None and max_pending_tokens < 1:
            raise ValueError(f"max_pending_tokens must be >= 1, got {max_pending_tokens}")
        if min_scale < 1:
            raise ValueError(f"min_scale must be >= 1, got {min_scale}")
        self.index = index
        self.max_pending_tokens = max_pending_tokens
        self.min_scale = min_scale

    def work(self, ctx: RequestContext, candidates: Sequence) -> list[int]:
        """Prompt tokens each candidate computes before this prompt's first token. Does not mutate."""
        held = ctx.held_blocks(self.index, candidates)
        return [pending_prefill_tokens(c) + ctx.num_prompt_tokens - held.get(c.worker_id, 0) * ctx.block_size for c in candidates]

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        work = self.work(ctx, candidates)
        if self.max_pending_tokens is not None:
            scale = self.max_pending_tokens + max(ctx.num_prompt_tokens, 1)
        else:
            scale = max(max(work, default=0), self.min_scale)
        return [max(0.0, 1.0 - w / scale) for w in work]
