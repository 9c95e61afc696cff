"""Routing plugins, table-driven: each scorer, the picker, and the policies."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from gateway.prefix_index import PrefixIndex
from gateway.scheduling.base import RequestContext
from gateway.scheduling.health_filter import HealthFilter
from gateway.scheduling.in_flight import InFlightScorer
from gateway.scheduling.kv_usage import KVUsageScorer
from gateway.scheduling.max_score_picker import MaxScorePicker
from gateway.scheduling.model_filter import ModelFilter
from gateway.scheduling.overload_filter import OverloadFilter
from gateway.scheduling.prefill_work import PrefillWorkScorer
from gateway.scheduling.prefix_affinity import PrefixAffinityScorer
from gateway.scheduling.queue_depth import QueueDepthScorer
from gateway.scheduling.role_filter import RoleFilter
from gateway.scheduling.router import Router
from gateway.scheduling.scheduling_config import SchedulingConfig
from gateway.scheduling.session_affinity import SessionAffinityScorer
from gateway.scheduling.weighted_random_picker import WeightedRandomPicker
from protos.tandem.v1 import worker_pb2


def worker(wid: str, running: int = 0, waiting: int = 0, usage: float = 0.0, in_flight: int = 0, role: str = "decode",
           model: str = "m", connected: bool = True, pending: int = 0, in_flight_tokens: int = 0):  # fmt: skip
    load = worker_pb2.LoadSnapshot(worker_id=wid, num_requests_running=running, num_requests_waiting=waiting, kv_cache_usage=usage,
                                   num_pending_prefill_tokens=pending)  # fmt: skip
    registration = SimpleNamespace(model=model)
    return SimpleNamespace(worker_id=wid, load=load, num_in_flight=in_flight, role=role, registration=registration, connected=connected,
                           retired=False, num_in_flight_tokens=in_flight_tokens)  # fmt: skip


def router(policy: str = "prefix-aware", index: PrefixIndex | None = None, rng: random.Random | None = None, **document) -> Router:
    return Router(SchedulingConfig(policy=policy).merged(document), index or PrefixIndex(), rng or random.Random(0))


def index_with(holdings: dict[str, list[int]]) -> PrefixIndex:
    index = PrefixIndex()
    for wid, hashes in holdings.items():
        batch = worker_pb2.KVEventBatch(sequence=1, events=[worker_pb2.KVEvent(stored=worker_pb2.BlocksStored(block_hashes=hashes))])
        assert index.apply(wid, batch)
    return index


PROMPT = [11, 12, 13, 14]


@pytest.mark.parametrize(
    "holdings, expected",
    [
        ({"a": [11, 12, 13, 14], "b": [11, 12], "c": []}, [1.0, 0.5, 0.0]),
        ({"a": [12, 13, 14], "b": [11, 13, 14], "c": [11, 12, 13]}, [0.0, 0.25, 0.75]),  # a hole ends the run
        ({}, [0.0, 0.0, 0.0]),
    ],
)
def test_prefix_affinity_is_the_leading_run_share(holdings, expected):
    scorer = PrefixAffinityScorer(index_with(holdings))
    ctx = RequestContext("r", 64, PROMPT)
    assert scorer.score(ctx, [worker("a"), worker("b"), worker("c")]) == expected


def test_prefix_affinity_of_a_prompt_shorter_than_a_block_is_zero():
    scorer = PrefixAffinityScorer(index_with({"a": [11]}))
    assert scorer.score(RequestContext("r", 5, []), [worker("a")]) == [0.0]


@pytest.mark.parametrize(
    "workers, expected",
    [
        ([worker("a"), worker("b")], [1.0, 1.0]),  # all idle
        ([worker("a", running=4), worker("b", running=1, waiting=1), worker("c", running=9)], [0.5, 0.75, 0.0]),
        ([worker("a", running=1, in_flight=4), worker("b", running=2)], [0.5, 0.75]),  # in-flight counts when larger
    ],
)
def test_queue_depth_scores_fewer_requests_higher(workers, expected):
    assert QueueDepthScorer(saturation=8).score(RequestContext("r", 1), workers) == expected


def test_kv_usage_scores_free_cache_higher():
    a, b = worker("a", usage=0.25), worker("b", usage=1.0)
    b_unknown = SimpleNamespace(worker_id="c", load=None, num_in_flight=0)
    assert KVUsageScorer().score(RequestContext("r", 1), [a, b, b_unknown]) == [0.75, 0.0, 1.0]


def test_max_score_picker_breaks_ties_at_random_over_all_tied():
    ws = [worker("a"), worker("b"), worker("c")]
    picked = {MaxScorePicker().pick(ws, [0.5, 0.9, 0.9], random.Random(seed)).worker_id for seed in range(50)}
    assert picked == {"b", "c"}
    assert MaxScorePicker().pick([], [], random.Random(0)) is None


@pytest.mark.parametrize(
    "cached_blocks, warm_in_flight, expected",
    [
        (4, 0, "warm"),
        (4, 3, "warm"),  # a burst stays on the warm worker for a few requests...
        (4, 5, "cold"),  # ...and spreads once its queue outweighs the full prefix hit
        (2, 0, "warm"),
        (2, 3, "cold"),  # half the prompt cached is worth fewer queued requests
        (0, 1, "cold"),
    ],
)
def test_prefix_aware_goes_to_the_warm_worker_until_its_queue_grows(cached_blocks, warm_in_flight, expected):
    r = router("prefix-aware", index_with({"warm": PROMPT[:cached_blocks], "cold": []}))
    warm, cold = worker("warm", in_flight=warm_in_flight), worker("cold")
    assert r.pick(RequestContext("r", 64, PROMPT), [cold, warm]).worker_id == expected


def test_round_robin_turns_through_the_workers_in_a_stable_order():
    r = router("round-robin")
    ws = [worker("b"), worker("a"), worker("c")]
    assert [r.pick(RequestContext("r", 1), ws).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_random_and_least_loaded():
    ws = [worker("a", running=3), worker("b")]
    assert {router("random", rng=random.Random(s)).pick(RequestContext("r", 1), ws).worker_id for s in range(40)} == {"a", "b"}
    assert router("least-loaded").pick(RequestContext("r", 1), ws).worker_id == "b"


def test_unknown_policy_is_refused_and_empty_candidates_give_none():
    with pytest.raises(ValueError, match="policy must be one of"):
        router("fastest")
    assert router("prefix-aware").pick(RequestContext("r", 1), []) is None


def test_profile_reports_each_plugins_time():
    seen = []
    r = router("prefix-aware", index_with({"a": PROMPT}))
    r.pick(RequestContext("r", 64, PROMPT), [worker("a")], observe=lambda name, sec: seen.append(name))
    assert seen == [
        "role-filter[decode]",
        "health-filter",
        "model-filter",
        "overload-filter",
        "prefix-affinity",
        "prefill-work",
        "queue-depth",
        "kv-usage",
        "session-affinity",
        "max-score",
    ]


# ---- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plugin, workers, ctx, expected",
    [
        (RoleFilter("decode"), [worker("a"), worker("p", role="prefill"), worker("t", role="tokenizer")], RequestContext("r", 1), ["a"]),
        (RoleFilter("prefill"), [worker("a"), worker("p", role="prefill")], RequestContext("r", 1), ["p"]),
        (HealthFilter(), [worker("a"), worker("b", connected=False)], RequestContext("r", 1), ["a"]),
        (ModelFilter(), [worker("a", model="x"), worker("b", model="y")], RequestContext("r", 1, model="y"), ["b"]),
        (ModelFilter(), [worker("a", model="x"), worker("b", model="y")], RequestContext("r", 1), ["a", "b"]),  # no model named: any
        (ModelFilter(), [worker("a", model="x")], RequestContext("r", 1, model="z"), []),
        (OverloadFilter(4, 0.9), [worker("a", running=4), worker("b", running=3), worker("c", usage=0.95)], RequestContext("r", 1), ["b"]),
        (OverloadFilter(4, 0.9), [worker("a", running=4), worker("c", usage=0.95)], RequestContext("r", 1), ["a", "c"]),  # all overloaded: all stay
        (OverloadFilter(0, 1.0), [worker("a", running=400, usage=1.0)], RequestContext("r", 1), ["a"]),  # 0 / 1.0: off
        (OverloadFilter(4, 1.0), [worker("a", in_flight=5), worker("b")], RequestContext("r", 1), ["b"]),  # this gateway's in-flight counts
    ],
)
def test_filters(plugin, workers, ctx, expected):
    assert [w.worker_id for w in plugin.filter(ctx, workers)] == expected


def test_health_filter_drops_a_retired_worker():
    retiring = worker("a")
    retiring.retired = True
    assert HealthFilter().filter(RequestContext("r", 1), [retiring, worker("b")])[0].worker_id == "b"


# ---- in-flight, session affinity, prefill backlog, weighted random ------------------------------


@pytest.mark.parametrize(
    "in_flight, expected",
    [([0, 0], [1.0, 1.0]), ([4, 2, 0], [0.0, 0.5, 1.0]), ([3], [0.0])],
)
def test_in_flight_ranks_by_this_gateways_count(in_flight, expected):
    ws = [worker(str(i), in_flight=n) for i, n in enumerate(in_flight)]
    assert InFlightScorer().score(RequestContext("r", 1), ws) == expected


def test_session_affinity_returns_a_session_to_its_worker_and_forgets_the_oldest():
    scorer = SessionAffinityScorer(max_sessions=2)
    a, b = worker("a"), worker("b")
    assert scorer.score(RequestContext("r", 1, session_id="s1"), [a, b]) == [0.0, 0.0]
    scorer.on_picked(RequestContext("r", 1, session_id="s1"), b)
    scorer.on_picked(RequestContext("r", 1, session_id="s2"), a)
    scorer.on_picked(RequestContext("r", 1), a)  # no session: nothing remembered
    assert scorer.score(RequestContext("r", 1, session_id="s1"), [a, b]) == [0.0, 1.0]
    assert scorer.score(RequestContext("r", 1), [a, b]) == [0.0, 0.0]
    scorer.on_picked(RequestContext("r", 1, session_id="s3"), a)  # past the bound: s1 (least recent) goes
    assert len(scorer) == 2 and scorer.score(RequestContext("r", 1, session_id="s1"), [a, b]) == [0.0, 0.0]
    scorer.check_integrity()


def test_prefix_aware_keeps_a_session_on_its_worker_through_a_router():
    r = router("prefix-aware")
    ctx = RequestContext("r", 1, session_id="chat-7")
    first = r.pick(ctx, [worker("a"), worker("b"), worker("c")])
    for _ in range(10):
        assert r.pick(ctx, [worker("a"), worker("b"), worker("c")]).worker_id == first.worker_id


@pytest.mark.parametrize(
    "pending, in_flight_tokens, held_blocks, expected",
    [
        (0, 0, 0, 1.0 - 64 / (8192 + 64)),
        (0, 0, 4, 1.0),  # the whole prompt cached, nothing queued
        (2048, 0, 4, 1.0 - 2048 / (8192 + 64)),
        (0, 4096, 2, 1.0 - (4096 + 32) / (8192 + 64)),  # this gateway's backlog counts when larger
        (9000, 0, 0, 0.0),
    ],
)
def test_prefill_work_counts_backlog_and_uncached_tokens(pending, in_flight_tokens, held_blocks, expected):
    w = worker("p", role="prefill", pending=pending, in_flight_tokens=in_flight_tokens)
    scorer = PrefillWorkScorer(index_with({"p": PROMPT[:held_blocks]}), 8192)
    assert scorer.score(RequestContext("r", 64, PROMPT, block_size=16), [w]) == [pytest.approx(expected)]


def test_weighted_random_picks_in_proportion_to_score():
    ws = [worker("a"), worker("b"), worker("c")]
    rng = random.Random(1)
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(4000):
        counts[WeightedRandomPicker().pick(ws, [0.75, 0.25, 0.0], rng).worker_id] += 1
    assert counts["c"] == 0
    assert 0.70 < counts["a"] / 4000 < 0.80
    assert {WeightedRandomPicker().pick(ws, [0.0, 0.0, 0.0], random.Random(s)).worker_id for s in range(50)} == {"a", "b", "c"}
    assert WeightedRandomPicker().pick([], [], rng) is None


@pytest.mark.parametrize("policy", ["random", "round-robin", "least-loaded", "prefix-aware"])
def test_every_policy_applies_role_health_and_model_filters(policy):
    ws = [worker("p", role="prefill"), worker("down", connected=False), worker("other", model="x"), worker("ok")]
    r = router(policy)
    assert {r.pick(RequestContext("r", 1, model="m"), ws).worker_id for _ in range(20)} == {"ok"}
    assert r.pick(RequestContext("r", 1, model="m"), ws[:3]) is None


def test_configure_switches_policy_and_weights_live():
    r = router("prefix-aware", index_with({"warm": PROMPT}))
    ctx = RequestContext("r", 64, PROMPT)
    assert r.pick(ctx, [worker("cold"), worker("warm")]).worker_id == "warm"
    r.configure(SchedulingConfig().merged({"weights": {"prefix_affinity": 0.0}, "picker": "max-score"}))
    assert {r.pick(ctx, [worker("cold"), worker("warm", running=1)]).worker_id for _ in range(10)} == {"cold"}
    r.configure(SchedulingConfig(policy="round-robin"))
    assert r.policy == "round-robin" and not r.needs_block_hashes


@pytest.mark.parametrize(
    "prompt_tokens, warm_pending, expected",
    [
        (64, 0, [pytest.approx(1 - 0 / 2048), pytest.approx(1 - 64 / 2048)]),  # short prompt: the floor scale, scores barely differ
        (4096, 0, [pytest.approx(1 - 1024 / 4096), 0.0]),  # a long prompt: the largest work sets the scale
        (4096, 4000, [pytest.approx(1 - 5024 / 5024), pytest.approx(1 - 4096 / 5024)]),  # the warm worker's backlog outweighs its hit
    ],
)
def test_decode_prefill_work_is_relative_with_a_floor(prompt_tokens, warm_pending, expected):
    blocks = prompt_tokens // 16
    prompt = list(range(1000, 1000 + blocks))
    held = prompt if prompt_tokens == 64 else prompt[: blocks * 3 // 4]  # 64: all 4 blocks; else three quarters
    scorer = PrefillWorkScorer(index_with({"warm": held}))
    ctx = RequestContext("r", prompt_tokens, prompt, block_size=16)
    assert scorer.score(ctx, [worker("warm", pending=warm_pending), worker("cold")]) == expected


def test_decode_backlog_counts_this_gateways_in_flight_prompt_tokens():
    scorer = PrefillWorkScorer(PrefixIndex())
    ctx = RequestContext("r", 100, [], block_size=16)
    assert scorer.work(ctx, [worker("a", pending=50, in_flight_tokens=300), worker("b", pending=500, in_flight_tokens=20)]) == [400, 600]


def test_one_decision_walks_the_index_once_per_candidate_set():
    index = index_with({"a": PROMPT, "b": PROMPT[:2]})
    calls = []
    match = index.match
    index.match = lambda hashes, ids=None: calls.append(tuple(ids)) or match(hashes, ids)
    r = router("prefix-aware", index)
    ctx = RequestContext("r", 64, PROMPT, block_size=16)
    assert r.pick(ctx, [worker("a"), worker("b")]).worker_id == "a"
    assert calls == [("a", "b")]  # prefix affinity and prefill work share one match
    r.pick(ctx, [worker("b")])  # another candidate set (a retry without "a"): matched again
    assert calls == [("a", "b"), ("b",)]
