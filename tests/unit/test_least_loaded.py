"""Least-loaded routing: fewest requests (max of reported and in-flight), then emptiest KV cache, random ties."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from gateway.scheduling.least_loaded_picker import pick_least_loaded
from gateway.scheduling.worker_load import worker_load
from protos.tandem.v1 import worker_pb2


def handle(name, running=None, waiting=0, usage=0.0, in_flight=0):
    load = (
        None if running is None else worker_pb2.LoadSnapshot(worker_id=name, num_requests_running=running, num_requests_waiting=waiting, kv_cache_usage=usage)
    )
    return SimpleNamespace(name=name, load=load, num_in_flight=in_flight)


@pytest.mark.parametrize(
    "h, expected",
    [
        (handle("a"), (0, 0.0)),
        (handle("a", in_flight=3), (3, 0.0)),
        (handle("a", running=2, waiting=3, usage=0.5), (5, 0.5)),
        (handle("a", running=2, waiting=3, usage=0.5, in_flight=4), (5, 0.5)),  # reported is larger
        (handle("a", running=1, waiting=0, usage=0.25, in_flight=7), (7, 0.25)),  # in-flight is larger
        (handle("a", running=0, waiting=0, usage=0.75, in_flight=0), (0, 0.75)),
    ],
)
def test_worker_load(h, expected):
    assert worker_load(h) == expected


@pytest.mark.parametrize(
    "candidates, expected",
    [
        ([handle("a", running=3), handle("b", running=1), handle("c", running=2)], "b"),
        ([handle("a", running=1, waiting=4), handle("b", running=3, waiting=0)], "b"),  # running + waiting
        ([handle("a", running=0, in_flight=5), handle("b", running=2)], "b"),  # in-flight counts
        ([handle("a", running=9, in_flight=1), handle("b", running=2, in_flight=3)], "b"),
        ([handle("a", running=2, usage=0.9), handle("b", running=2, usage=0.1), handle("c", running=3, usage=0.0)], "b"),
        ([handle("a", running=1, usage=0.0), handle("b", running=0, usage=0.99)], "b"),  # count before usage
        ([handle("a"), handle("b", running=0, usage=0.2)], "a"),  # no report yet: counts as idle and empty
        ([handle("a", in_flight=1), handle("b", running=0, usage=0.2)], "b"),
        ([handle("only", running=50, usage=1.0, in_flight=50)], "only"),
    ],
)
@pytest.mark.parametrize("seed", range(5))
def test_pick_least_loaded(candidates, expected, seed):
    assert pick_least_loaded(candidates, random.Random(seed)).name == expected


@pytest.mark.parametrize("empty", [[], ()])
def test_pick_from_nothing_is_none(empty):
    assert pick_least_loaded(empty, random.Random(0)) is None


@pytest.mark.parametrize(
    "candidates, tied",
    [
        ([handle("a", running=1), handle("b", running=1), handle("c", running=1)], {"a", "b", "c"}),
        ([handle("a", running=1, usage=0.5), handle("b", running=0, in_flight=1, usage=0.5), handle("c", running=2)], {"a", "b"}),
        ([handle("a"), handle("b"), handle("c", running=0, usage=0.0), handle("d", usage=0.1, running=0)], {"a", "b", "c"}),
    ],
)
def test_ties_broken_at_random_over_all_tied(candidates, tied):
    picks = {pick_least_loaded(candidates, random.Random(seed)).name for seed in range(200)}
    assert picks == tied


def test_pick_does_not_mutate_and_uses_the_given_rng():
    candidates = [handle(n, running=1, usage=0.3) for n in "abcd"]
    snapshot = [(h.name, h.load.SerializeToString(), h.num_in_flight) for h in candidates]
    a = [pick_least_loaded(candidates, rng).name for rng in [random.Random(42)] for _ in range(20)]
    b = [pick_least_loaded(candidates, rng).name for rng in [random.Random(42)] for _ in range(20)]
    assert a == b, "same seed, same choices"
    assert len(set(a)) > 1
    assert [(h.name, h.load.SerializeToString(), h.num_in_flight) for h in candidates] == snapshot
