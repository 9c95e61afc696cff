"""KV utilisation: a worker with more free KV blocks scores higher (1 − used / total)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext


class KVUsageScorer:
    name = "kv-usage"

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        return [1.0 - (c.load.kv_cache_usage if c.load is not None else 0.0) for c in candidates]
