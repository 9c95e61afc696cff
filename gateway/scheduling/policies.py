"""The routing policies the gateway can run, built from a SchedulingConfig (and rebuilt live).

    every policy     role → health → model filters (a worker must be able to serve the request)
    prefix-aware     + overload filter; weighted scorers: prefix affinity, prefill work (backlog +
                     uncached tokens), queue depth, KV usage, in-flight, session affinity;
                     max-score or weighted-random picker
    least-loaded     fewest requests, then emptiest KV cache (gateway/least_loaded.py)
    random           any worker that passed the filters
    round-robin      each such worker in turn

Prefill workers (for the P/D decider) are chosen by the prompt tokens they would compute before
this prompt is done (backlog + what they lack of it; prefill_work.py), below their queue limit.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

from ..least_loaded import pick_least_loaded
from ..prefix_index import PrefixIndex
from .base import Profile, RequestContext
from .health_filter import HealthFilter
from .in_flight import InFlightScorer
from .kv_usage import KVUsageScorer
from .max_score_picker import MaxScorePicker
from .model_filter import ModelFilter
from .overload_filter import OverloadFilter
from .prefill_work import PrefillWorkScorer, pending_prefill_tokens
from .prefix_affinity import PrefixAffinityScorer
from .queue_depth import QueueDepthScorer
from .role_filter import RoleFilter
from .scheduling_config import SchedulingConfig
from .session_affinity import SessionAffinityScorer
from .weighted_random_picker import WeightedRandomPicker

POLICIES = ("least-loaded", "prefix-aware", "random", "round-robin")


class Router:
    """Picks the decode worker (and the prefill worker) for a request under the current config.
    Keeps the round-robin counter and the session table across reconfigurations."""

    def __init__(self, config: SchedulingConfig, index: PrefixIndex, rng: random.Random | None = None):
        self.index = index
        self.rng = rng or random.Random()
        self._turn = itertools.count()
        self._sessions = SessionAffinityScorer()
        self._eligible = [RoleFilter("decode"), HealthFilter(), ModelFilter()]
        self.configure(config)

    def configure(self, config: SchedulingConfig) -> None:
        """Switch to `config` (one assignment per profile, so a decision in progress on the event
        loop sees either the old or the new one). Mutates."""
        w, t, d = config.weights, config.thresholds, config.disaggregation
        picker = MaxScorePicker() if config.picker == "max-score" else WeightedRandomPicker()
        self.profile = Profile(
            "prefix-aware",
            [*self._eligible, OverloadFilter(t.overload_queue_depth, t.overload_kv_usage)],
            [
                (PrefixAffinityScorer(self.index), w.prefix_affinity),
                (PrefillWorkScorer(self.index, min_scale=t.prefill_work_scale), w.prefill_work),
                (QueueDepthScorer(t.queue_saturation), w.queue_depth),
                (KVUsageScorer(), w.kv_usage),
                (InFlightScorer(), w.in_flight),
                (self._sessions, w.session_affinity),
            ],
            picker,
        )
        self.prefill_profile = Profile(
            "prefill",
            [RoleFilter("prefill"), HealthFilter(), ModelFilter()],
            [(PrefillWorkScorer(self.index, d.prefill_max_pending_tokens), 1.0)],
            MaxScorePicker(),
        )
        self.config = config

    @property
    def policy(self) -> str:
        return self.config.policy

    @property
    def needs_block_hashes(self) -> bool:
        return self.policy == "prefix-aware"

    def pick(self, ctx: RequestContext, candidates: Iterable, observe=None):
        """The decode worker for `ctx` among `candidates` (None when none may take it).
        `observe(plugin, seconds)` times the plugins."""
        if self.policy == "prefix-aware":
            return self.profile.schedule(ctx, list(candidates), self.rng, observe)
        eligible = list(candidates)
        for f in self._eligible:
            eligible = f.filter(ctx, eligible)
        if not eligible:
            return None
        if self.policy == "least-loaded":
            return pick_least_loaded(eligible, self.rng)
        if self.policy == "random":
            return self.rng.choice(eligible)
        eligible.sort(key=lambda c: c.worker_id)  # a stable order to turn through
        return eligible[next(self._turn) % len(eligible)]

    def pick_prefill(self, ctx: RequestContext, candidates: Iterable, respect_limit: bool = True, observe=None):
        """The prefill worker for `ctx`: its own prefix hits and backlog. With `respect_limit`,
        only workers below the queue limit (None when all are at it)."""
        limit = self.config.disaggregation.prefill_max_pending_tokens
        eligible = [c for c in candidates if not respect_limit or pending_prefill_tokens(c) < limit]
        return self.prefill_profile.schedule(ctx, eligible, self.rng, observe)

    def check_integrity(self) -> None:
        self._sessions.check_integrity()
