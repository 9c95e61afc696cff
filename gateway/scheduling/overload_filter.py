"""Overload filter: leave out workers whose queue or KV cache is full, while others have room.

A worker whose queue is `max_queue_depth` deep, or whose KV cache is `max_kv_usage` full, would
make the request wait (or preempt another) even with a perfect prefix hit. When every candidate
is overloaded they all stay: the request queues on the best of them rather than failing, as a
vLLM server would queue it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext
from .worker_load import worker_load


class OverloadFilter:
    name = "overload-filter"

    def __init__(self, max_queue_depth: int, max_kv_usage: float):
        self.max_queue_depth = max_queue_depth  # 0 = no limit
        self.max_kv_usage = max_kv_usage  # 1.0 = no limit

    def filter(self, ctx: RequestContext, candidates: Sequence) -> list:
        kept = [c for c in candidates if not self._overloaded(c)]
        return kept if kept else list(candidates)

    def _overloaded(self, c) -> bool:
        depth, usage = worker_load(c)
        if self.max_queue_depth and depth >= self.max_queue_depth:
            return True
        return self.max_kv_usage < 1.0 and usage >= self.max_kv_usage
