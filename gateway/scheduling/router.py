"""Router: the gateway's routing decisions under the current SchedulingConfig, rebuilt live.

    pick(ctx, workers)          the decode worker: the config's policy, a profile from registry.py
    pick_prefill(ctx, workers)  the prefill worker for the P/D decider: the prompt tokens each would
                                compute before this prompt is done (backlog + what it lacks of the
                                prompt; prefill_work.py), below its queue limit

What outlives a reconfiguration (the session table, the round-robin turn) lives in one
RouterState, which every profile built for this router shares.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from ..prefix_index import PrefixIndex
from .base import RequestContext
from .prefill_work import pending_prefill_tokens
from .registry import RouterState, build_prefill_profile, build_profile
from .scheduling_config import SchedulingConfig


class Router:
    """Picks the decode worker (and the prefill worker) for a request under the current config."""

    def __init__(self, config: SchedulingConfig, index: PrefixIndex, rng: random.Random | None = None):
        self.index = index
        self.rng = rng or random.Random()
        self._state = RouterState(index)
        self.configure(config)

    def configure(self, config: SchedulingConfig) -> None:
        """Switch to `config` (one assignment per profile, so a decision in progress on the event
        loop sees either the old or the new one). Raises ValueError, changing nothing, for a
        policy or picker no profile is registered under. Mutates."""
        profile = build_profile(config, self._state)
        prefill_profile = build_prefill_profile(config, self._state)
        self.profile, self.prefill_profile, self.config = profile, prefill_profile, config

    @property
    def policy(self) -> str:
        return self.config.policy

    @property
    def needs_block_hashes(self) -> bool:
        """Whether the current policy reads the prompt's block hashes (see Profile)."""
        return self.profile.needs_block_hashes

    def pick(self, ctx: RequestContext, candidates: Iterable, observe=None):
        """The decode worker for `ctx` among `candidates` (None when none may take it).
        `observe(plugin, seconds)` times the plugins. Mutates only plugin state (the session
        table, the round-robin turn)."""
        return self.profile.schedule(ctx, list(candidates), self.rng, observe)

    def pick_prefill(self, ctx: RequestContext, candidates: Iterable, respect_limit: bool = True, observe=None):
        """The prefill worker for `ctx`: its own prefix hits and backlog. With `respect_limit`,
        only workers below the queue limit (None when all are at it)."""
        limit = self.config.disaggregation.prefill_max_pending_tokens
        eligible = [c for c in candidates if not respect_limit or pending_prefill_tokens(c) < limit]
        return self.prefill_profile.schedule(ctx, eligible, self.rng, observe)

    def check_integrity(self) -> None:
        self._state.sessions.check_integrity()
