"""Least-loaded: the candidate with the fewest requests, then the emptiest KV cache (worker_load.py).

The `least-loaded` policy, for comparison with prefix-aware routing: it ignores the scores (the
policy has no scorers) and every cache hit, and breaks ties at random so equal workers share load.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .worker_load import worker_load


def pick_least_loaded(candidates: Sequence, rng: random.Random) -> object | None:
    """The least-loaded handle, or None when there is none. Does not mutate."""
    if not candidates:
        return None
    loads = [worker_load(h) for h in candidates]
    best = min(loads)
    return rng.choice([h for h, load in zip(candidates, loads) if load == best])


class LeastLoadedPicker:
    name = "least-loaded"

    def pick(self, candidates: Sequence, scores: list[float], rng: random.Random):
        return pick_least_loaded(candidates, rng)
