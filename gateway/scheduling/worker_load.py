"""A worker's load as this gateway sees it: its request count, then its KV cache usage.

The request count is the larger of what the worker last reported (running + waiting: every
gateway's requests) and what this gateway has in flight there (fresher: counted at decision time,
so a burst does not all land on the worker that looked idle a moment ago). The least-loaded
picker orders workers by it; the queue-depth scorer and the overload filter read the same count.
"""

from __future__ import annotations


def worker_load(handle) -> tuple[int, float]:
    """(requests, KV cache usage) of a WorkerHandle; a worker that never reported counts as idle
    and empty. Does not mutate."""
    load = handle.load
    reported = (load.num_requests_running + load.num_requests_waiting) if load is not None else 0
    usage = load.kv_cache_usage if load is not None else 0.0
    return max(reported, handle.num_in_flight), usage
