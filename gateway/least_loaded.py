"""Least-loaded routing: the worker with the fewest requests, then the emptiest KV cache.

A worker's request count is the larger of what it last reported (running + waiting, every
gateway's requests) and what this gateway has in flight there (fresher: counted at decision
time, so a burst does not all land on the worker that looked idle a moment ago). Ties are broken
at random. It is the `least-loaded` policy (for comparison); the prefix-aware policy reads the same
request count through `worker_load` in its queue-depth scorer and overload filter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def worker_load(handle) -> tuple[int, float]:
    load = handle.load
    reported = (load.num_requests_running + load.num_requests_waiting) if load is not None else 0
    usage = load.kv_cache_usage if load is not None else 0.0
    return max(reported, handle.num_in_flight), usage


def pick_least_loaded(candidates: Sequence, rng: random.Random) -> object | None:
    """The least-loaded handle, or None when there is none. Does not mutate."""
    if not candidates:
        return None
    loads = [worker_load(h) for h in candidates]
    best = min(loads)
    return rng.choice([h for h, load in zip(candidates, loads) if load == best])
