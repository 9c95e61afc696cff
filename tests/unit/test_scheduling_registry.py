"""The routing-policy registry, table-driven: each name builds its profile of plugins; an unknown
name is refused with the known ones listed, by the config (file, etcd key, `tandem scheduling set`)
and by the registry itself; the router reads the same table."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from gateway.prefix_index import PrefixIndex
from gateway.scheduling import registry
from gateway.scheduling.base import Profile, RequestContext
from gateway.scheduling.random_picker import RandomPicker
from gateway.scheduling.registry import (
    PICKERS,
    POLICIES,
    RouterState,
    build_prefill_profile,
    build_profile,
    eligible_filters,
)
from gateway.scheduling.router import Router
from gateway.scheduling.scheduling_config import SchedulingConfig, parse_document
from protos.tandem.v1 import worker_pb2

ELIGIBLE = ["role-filter[decode]", "health-filter", "model-filter"]
PREFIX_AWARE_SCORERS = ["prefix-affinity", "prefill-work", "queue-depth", "kv-usage", "in-flight", "session-affinity"]


def worker(wid: str, running: int = 0):
    load = worker_pb2.LoadSnapshot(worker_id=wid, num_requests_running=running)
    return SimpleNamespace(worker_id=wid, load=load, num_in_flight=0, role="decode", registration=SimpleNamespace(model="m"),
                           connected=True, retired=False, num_in_flight_tokens=0)  # fmt: skip


@pytest.mark.parametrize(
    "policy, picker, filters, scorers, picker_name, hashes",
    [
        ("prefix-aware", "max-score", [*ELIGIBLE, "overload-filter"], PREFIX_AWARE_SCORERS, "max-score", True),
        ("prefix-aware", "weighted-random", [*ELIGIBLE, "overload-filter"], PREFIX_AWARE_SCORERS, "weighted-random", True),
        ("least-loaded", "max-score", ELIGIBLE, [], "least-loaded", False),
        ("random", "max-score", ELIGIBLE, [], "random", False),
        ("round-robin", "weighted-random", ELIGIBLE, [], "round-robin", False),  # the picker setting is prefix-aware's
    ],
)
def test_each_name_builds_its_profile(policy, picker, filters, scorers, picker_name, hashes):
    config = SchedulingConfig(policy=policy, picker=picker)
    profile = build_profile(config, RouterState(PrefixIndex()))
    assert isinstance(profile, Profile) and profile.name == policy
    assert [f.name for f in profile.filters] == filters
    assert [s.name for s, _ in profile.scorers] == scorers
    assert profile.picker.name == picker_name
    assert profile.needs_block_hashes is hashes


def test_the_table_covers_every_registered_policy():
    assert list(POLICIES) == ["prefix-aware", "least-loaded", "random", "round-robin"]  # the order errors list them in
    assert list(PICKERS) == ["max-score", "weighted-random"]


def test_prefix_aware_takes_its_weights_from_the_config():
    config = SchedulingConfig().merged({"weights": {"kv_usage": 0.0, "queue_depth": 7.5}})
    weights = {s.name: w for s, w in build_profile(config, RouterState(PrefixIndex())).scorers}
    assert weights["kv-usage"] == 0.0 and weights["queue-depth"] == 7.5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("policy", "fastest", "policy must be one of prefix-aware, least-loaded, random, round-robin, got 'fastest'"),
        ("picker", "best", "picker must be one of max-score, weighted-random, got 'best'"),
    ],
)
def test_an_unknown_name_is_refused_listing_the_known_ones(field, value, message):
    # the config refuses it (a document from a file, the etcd key or `tandem scheduling set`)...
    with pytest.raises(ValueError) as e:
        SchedulingConfig().merged(parse_document(f'{field} = "{value}"'))
    assert str(e.value) == message
    # ...and so does the registry, for a config that skipped validation
    unchecked = SimpleNamespace(**{**vars(SchedulingConfig()), field: value})
    with pytest.raises(ValueError) as e:
        build_profile(unchecked, RouterState(PrefixIndex()))
    assert str(e.value) == message


@pytest.mark.parametrize("value", [["random"], 3, None])
def test_a_policy_that_is_not_a_string_is_refused_by_name(value):
    with pytest.raises(ValueError, match=r"policy must be one of prefix-aware, least-loaded, random, round-robin, got "):
        SchedulingConfig().merged({"policy": value})


def test_a_registered_policy_is_valid_config_and_routable(monkeypatch):
    """Config validation and the router read the same table: register a name and both take it."""
    monkeypatch.setitem(POLICIES, "first", lambda config, state: Profile("first", eligible_filters("decode"), [], RandomPicker()))
    config = SchedulingConfig().merged({"policy": "first"})
    r = Router(config, PrefixIndex(), random.Random(0))
    assert r.pick(RequestContext("r", 1), [worker("a")]).worker_id == "a"
    monkeypatch.delitem(POLICIES, "first")
    with pytest.raises(ValueError, match="policy must be one of prefix-aware, least-loaded, random, round-robin, got 'first'"):
        SchedulingConfig(policy="first")


def test_reconfiguring_keeps_the_round_robin_turn_and_the_session_table():
    r = Router(SchedulingConfig(policy="round-robin"), PrefixIndex(), random.Random(0))
    ws = [worker("a"), worker("b"), worker("c")]
    assert r.pick(RequestContext("r", 1), ws).worker_id == "a"
    r.configure(SchedulingConfig(policy="round-robin").merged({"weights": {"kv_usage": 0.1}}))
    assert [r.pick(RequestContext("r", 1), ws).worker_id for _ in range(3)] == ["b", "c", "a"]

    r.configure(SchedulingConfig())
    session = RequestContext("r", 1, session_id="chat-1")
    first = r.pick(session, ws).worker_id
    r.configure(replace(SchedulingConfig(), session_header="x-chat"))  # a new profile, the same session table
    assert all(r.pick(session, ws).worker_id == first for _ in range(10))
    r.check_integrity()


def test_a_failed_reconfiguration_changes_nothing():
    r = Router(SchedulingConfig(policy="random"), PrefixIndex(), random.Random(0))
    before = (r.profile, r.prefill_profile, r.config)
    with pytest.raises(ValueError, match="policy must be one of"):
        r.configure(SimpleNamespace(**{**vars(SchedulingConfig()), "policy": "fastest"}))
    assert (r.profile, r.prefill_profile, r.config) == before


def test_every_policy_reports_its_plugins_time():
    for policy in POLICIES:
        seen: list[str] = []
        r = Router(SchedulingConfig(policy=policy), PrefixIndex(), random.Random(0))
        assert r.pick(RequestContext("r", 1), [worker("a")], observe=lambda name, sec, seen=seen: seen.append(name)).worker_id == "a"
        assert seen[:3] == ELIGIBLE and seen[-1] == r.profile.picker.name, policy


def test_the_prefill_profile_scores_prefill_work_against_the_queue_limit():
    config = SchedulingConfig().merged({"disaggregation": {"prefill_max_pending_tokens": 4096}})
    profile = build_prefill_profile(config, RouterState(PrefixIndex()))
    assert [f.name for f in profile.filters] == ["role-filter[prefill]", "health-filter", "model-filter"]
    ((scorer, weight),) = profile.scorers
    assert (scorer.name, scorer.max_pending_tokens, weight, profile.picker.name) == ("prefill-work", 4096, 1.0, "max-score")


def test_the_config_module_defines_no_policy_list_of_its_own():
    import gateway.scheduling.scheduling_config as sc

    assert sc.POLICIES is registry.POLICIES and sc.PICKERS is registry.PICKERS
