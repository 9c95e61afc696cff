"""Routing policies by name: each one a Profile of plugins (filters → weighted scorers → picker).

    name           filters                          scorers (weights from the config)      picker
    prefix-aware   eligible + overload              prefix affinity, prefill work, queue    the config's
                                                    depth, KV usage, in-flight, session     (max-score |
                                                    affinity                                weighted-random)
    least-loaded   eligible                         —                                       least-loaded
    random         eligible                         —                                       random
    round-robin    eligible                         —                                       round-robin

    eligible = role(decode) → health → model: a worker that can serve the request at all

POLICIES and PICKERS are the one list of names: SchedulingConfig validates `policy` and `picker`
against them (the TOML file, the live etcd key, `tandem scheduling set`) and the Router builds
its profile from them, so a policy is added here and nowhere else. The prefill profile (which
prefill worker the P/D decider asks) is not a policy: every config uses it.

A factory gets the config and the RouterState, which holds what must outlive a reconfiguration
(the prefix index, the session table, the round-robin turn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..prefix_index import PrefixIndex
from .base import Filter, Picker, Profile
from .health_filter import HealthFilter
from .in_flight import InFlightScorer
from .kv_usage import KVUsageScorer
from .least_loaded_picker import LeastLoadedPicker
from .max_score_picker import MaxScorePicker
from .model_filter import ModelFilter
from .overload_filter import OverloadFilter
from .prefill_work import PrefillWorkScorer
from .prefix_affinity import PrefixAffinityScorer
from .queue_depth import QueueDepthScorer
from .random_picker import RandomPicker
from .role_filter import RoleFilter
from .round_robin_picker import RoundRobinPicker
from .session_affinity import SessionAffinityScorer
from .weighted_random_picker import WeightedRandomPicker

if TYPE_CHECKING:  # scheduling_config imports this module (for the names it validates)
    from .scheduling_config import SchedulingConfig


@dataclass
class RouterState:
    """What a router's profiles share and keep across reconfigurations."""

    index: PrefixIndex
    sessions: SessionAffinityScorer = field(default_factory=SessionAffinityScorer)
    round_robin: RoundRobinPicker = field(default_factory=RoundRobinPicker)


PolicyFactory = Callable[["SchedulingConfig", RouterState], Profile]


def eligible_filters(role: str) -> list[Filter]:
    """The filters every profile starts with: the role, a healthy connection, the model."""
    return [RoleFilter(role), HealthFilter(), ModelFilter()]


def _prefix_aware(config: SchedulingConfig, state: RouterState) -> Profile:
    w, t = config.weights, config.thresholds
    return Profile(
        "prefix-aware",
        [*eligible_filters("decode"), OverloadFilter(t.overload_queue_depth, t.overload_kv_usage)],
        [
            (PrefixAffinityScorer(state.index), w.prefix_affinity),
            (PrefillWorkScorer(state.index, min_scale=t.prefill_work_scale), w.prefill_work),
            (QueueDepthScorer(t.queue_saturation), w.queue_depth),
            (KVUsageScorer(), w.kv_usage),
            (InFlightScorer(), w.in_flight),
            (state.sessions, w.session_affinity),
        ],
        PICKERS[config.picker](),
    )


def _least_loaded(config: SchedulingConfig, state: RouterState) -> Profile:
    return Profile("least-loaded", eligible_filters("decode"), [], LeastLoadedPicker())


def _random(config: SchedulingConfig, state: RouterState) -> Profile:
    return Profile("random", eligible_filters("decode"), [], RandomPicker())


def _round_robin(config: SchedulingConfig, state: RouterState) -> Profile:
    return Profile("round-robin", eligible_filters("decode"), [], state.round_robin)


# In the order error messages list them (the default first).
POLICIES: dict[str, PolicyFactory] = {
    "prefix-aware": _prefix_aware,
    "least-loaded": _least_loaded,
    "random": _random,
    "round-robin": _round_robin,
}

PICKERS: dict[str, Callable[[], Picker]] = {
    "max-score": MaxScorePicker,
    "weighted-random": WeightedRandomPicker,
}


def unknown_choice(name: str, value, choices) -> str:
    """The message for a name not in `choices` (the config's wording, kept for its users)."""
    return f"{name} must be one of {', '.join(choices)}, got {value!r}"


def build_profile(config: SchedulingConfig, state: RouterState) -> Profile:
    """The decode-worker profile of `config.policy`. Raises ValueError listing the known policies
    for an unknown one (a validated SchedulingConfig never has one). Does not mutate `state`."""
    factory = POLICIES.get(config.policy)
    if factory is None:
        raise ValueError(unknown_choice("policy", config.policy, POLICIES))
    if config.picker not in PICKERS:
        raise ValueError(unknown_choice("picker", config.picker, PICKERS))
    return factory(config, state)


def build_prefill_profile(config: SchedulingConfig, state: RouterState) -> Profile:
    """The prefill-worker profile: the worker that computes the prompt soonest (its own prefix
    hits and backlog, against the queue limit as a fixed scale)."""
    limit = config.disaggregation.prefill_max_pending_tokens
    return Profile("prefill", eligible_filters("prefill"), [(PrefillWorkScorer(state.index, limit), 1.0)], MaxScorePicker())
