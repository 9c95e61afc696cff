"""Routing plugins, table-driven: each scorer, the picker, and the policies."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from gateway.prefix_index import PrefixIndex
from gateway.scheduling.base import RequestContext
from gateway.scheduling.kv_usage import KVUsageScorer
from gateway.scheduling.max_score_picker import MaxScorePicker
from gateway.scheduling.policies import Router
from gateway.scheduling.prefix_affinity import PrefixAffinityScorer
from gateway.scheduling.queue_depth import QueueDepthScorer
from protos.tandem.v1 import worker_pb2


def worker(wid: str, running: int = 0, waiting: int = 0, usage: float = 0.0, in_flight: int = 0):
    load = worker_pb2.LoadSnapshot(worker_id=wid, num_requests_running=running, num_requests_waiting=waiting, kv_cache_usage=usage)
    return SimpleNamespace(worker_id=wid, load=load, num_in_flight=in_flight)


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
    router = Router("prefix-aware", index_with({"warm": PROMPT[:cached_blocks], "cold": []}), random.Random(0))
    warm, cold = worker("warm", in_flight=warm_in_flight), worker("cold")
    assert router.pick(RequestContext("r", 64, PROMPT), [cold, warm]).worker_id == expected


def test_round_robin_turns_through_the_workers_in_a_stable_order():
    router = Router("round-robin", PrefixIndex())
    ws = [worker("b"), worker("a"), worker("c")]
    assert [router.pick(RequestContext("r", 1), ws).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_random_and_least_loaded():
    ws = [worker("a", running=3), worker("b")]
    assert {Router("random", PrefixIndex(), random.Random(s)).pick(RequestContext("r", 1), ws).worker_id for s in range(40)} == {"a", "b"}
    assert Router("least-loaded", PrefixIndex()).pick(RequestContext("r", 1), ws).worker_id == "b"


def test_unknown_policy_is_refused_and_empty_candidates_give_none():
    with pytest.raises(ValueError, match="routing policy must be one of"):
        Router("fastest", PrefixIndex())
    assert Router("prefix-aware", PrefixIndex()).pick(RequestContext("r", 1), []) is None


def test_profile_reports_each_plugins_time():
    seen = []
    router = Router("prefix-aware", index_with({"a": PROMPT}))
    router.pick(RequestContext("r", 64, PROMPT), [worker("a")], observe=lambda name, sec: seen.append(name))
    assert seen == ["prefix-affinity", "queue-depth", "kv-usage", "max-score"]
