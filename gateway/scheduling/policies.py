"""The routing policies the gateway can run (`--routing-policy`), for use and for comparison.

    least-loaded   fewest requests, then emptiest KV cache (gateway/least_loaded.py)
    prefix-aware   1 × prefix affinity + 2 × queue depth (saturating at 8) + 0.5 × KV usage, max
                   score: a full prefix hit is worth about four queued requests
    random         any ready worker
    round-robin    each ready worker in turn
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from ..least_loaded import pick_least_loaded
from ..prefix_index import PrefixIndex
from .base import Profile, RequestContext
from .kv_usage import KVUsageScorer
from .max_score_picker import MaxScorePicker
from .prefix_affinity import PrefixAffinityScorer
from .queue_depth import QueueDepthScorer

POLICIES = ("least-loaded", "prefix-aware", "random", "round-robin")


class Router:
    """Picks the worker for a request under one policy. Keeps only the round-robin counter."""

    def __init__(self, policy: str, index: PrefixIndex, rng: random.Random | None = None):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.rng = rng or random.Random()
        self._turn = itertools.count()
        self.profile = Profile(
            "prefix-aware",
            [(PrefixAffinityScorer(index), 1.0), (QueueDepthScorer(saturation=8), 2.0), (KVUsageScorer(), 0.5)],
            MaxScorePicker(),
        )

    @property
    def needs_block_hashes(self) -> bool:
        return self.policy == "prefix-aware"

    def pick(self, ctx: RequestContext, candidates: Sequence, observe=None):
        """One of `candidates` (None if empty). `observe(plugin, seconds)` times the plugins."""
        if not candidates:
            return None
        if self.policy == "prefix-aware":
            return self.profile.schedule(ctx, candidates, self.rng, observe)
        if self.policy == "least-loaded":
            return pick_least_loaded(candidates, self.rng)
        if self.policy == "random":
            return self.rng.choice(list(candidates))
        ordered = sorted(candidates, key=lambda c: c.worker_id)  # a stable order to turn through
        return ordered[next(self._turn) % len(ordered)]
