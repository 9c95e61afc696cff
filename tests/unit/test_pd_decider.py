"""The P/D decider, table-driven: the decode worker's uncached tokens against the threshold, and
the prefill worker chosen by its own prefix hits and backlog, below its queue limit."""

from __future__ import annotations

import random

import pytest

from gateway.pd_decider import decide, uncached_tokens
from gateway.prefix_index import PrefixIndex
from gateway.scheduling.base import RequestContext
from gateway.scheduling.router import Router
from gateway.scheduling.scheduling_config import SchedulingConfig
from protos.tandem.v1 import gateway_pb2, worker_pb2
from services.common.errors import RequestError
from tests.unit.test_scheduling import index_with, worker

AUTO, AGG, DISAGG = gateway_pb2.SERVING_MODE_AUTO, gateway_pb2.SERVING_MODE_AGGREGATED, gateway_pb2.SERVING_MODE_DISAGGREGATED
PROMPT = list(range(100, 164))  # 64 blocks of 16 tokens = 1,024 tokens
CTX = RequestContext("r", 1024, PROMPT, block_size=16)


def router(index: PrefixIndex, **disaggregation) -> Router:
    config = SchedulingConfig().merged({"disaggregation": {"min_uncached_tokens": 512, **disaggregation}})
    return Router(config, index, random.Random(0))


@pytest.mark.parametrize(
    "mode, decode_holds, prefills, expected_prefill, reason",
    [
        (AUTO, 0, [worker("p", role="prefill")], "p", "disaggregated"),  # 1,024 uncached ≥ 512
        (AUTO, 40, [worker("p", role="prefill")], None, "below-threshold"),  # 40 blocks held: 384 uncached
        (AUTO, 32, [worker("p", role="prefill")], "p", "disaggregated"),  # exactly 512 uncached
        (AUTO, 0, [], None, "prefill-unavailable"),
        (AUTO, 0, [worker("p", role="prefill", pending=8192)], None, "prefill-unavailable"),  # at its queue limit
        (AUTO, 0, [worker("p", role="prefill", in_flight_tokens=9000)], None, "prefill-unavailable"),  # this gateway's backlog
        (AUTO, 0, [worker("p", role="prefill", connected=False)], None, "prefill-unavailable"),
        (AUTO, 0, [worker("p", role="prefill", pending=8192), worker("q", role="prefill")], "q", "disaggregated"),
        (AGG, 0, [worker("p", role="prefill")], None, "forced-aggregated"),
        (DISAGG, 64, [worker("p", role="prefill", pending=9000)], "p", "forced-disaggregated"),  # forced: limit ignored
    ],
)
def test_decide(mode, decode_holds, prefills, expected_prefill, reason):
    decode = worker("d")
    index = index_with({"d": PROMPT[:decode_holds]})
    decision = decide(mode, CTX, decode, [decode, *prefills], router(index))
    assert decision.reason == reason
    assert (decision.prefill.worker_id if decision.prefill else None) == expected_prefill
    assert decision.disaggregate == (expected_prefill is not None)


def test_threshold_zero_never_disaggregates_in_auto():
    decision = decide(AUTO, CTX, worker("d"), [worker("p", role="prefill")], router(PrefixIndex(), min_uncached_tokens=0))
    assert not decision.disaggregate and decision.reason == "below-threshold"


def test_forced_disaggregation_without_a_prefill_worker_is_unavailable():
    with pytest.raises(RequestError, match="no prefill worker is ready") as e:
        decide(DISAGG, CTX, worker("d"), [worker("d2")], router(PrefixIndex()))
    assert e.value.code.name == "UNAVAILABLE"


@pytest.mark.parametrize(
    "holdings, loads, expected",
    [
        ({"p1": PROMPT[:60], "p2": []}, {}, "p1"),  # its own prefix hits
        ({"p1": PROMPT[:60], "p2": []}, {"p1": 7000}, "p2"),  # ... unless its backlog outweighs them
        ({"p1": PROMPT[:8], "p2": PROMPT[:60]}, {"p1": 0, "p2": 500}, "p2"),  # 500 + 64 tokens of work < 0 + 896
        ({"p1": PROMPT[:8], "p2": PROMPT[:60]}, {"p1": 0, "p2": 1000}, "p1"),  # 1000 + 64 > 896
        ({}, {"p1": 4000, "p2": 1000}, "p2"),  # nobody holds it: the emptier queue
    ],
)
def test_the_prefill_worker_is_chosen_by_its_prefix_hits_and_backlog(holdings, loads, expected):
    prefills = [worker(w, role="prefill", pending=loads.get(w, 0)) for w in ("p1", "p2")]
    decision = decide(AUTO, CTX, worker("d"), prefills, router(index_with({"d": [], **holdings})))
    assert decision.prefill.worker_id == expected


def test_uncached_tokens_counts_the_leading_run_only():
    index = index_with({"d": PROMPT[:10] + PROMPT[11:20]})  # a hole at block 10
    assert uncached_tokens(CTX, index, worker("d")) == 1024 - 10 * 16
    assert uncached_tokens(RequestContext("r", 7), index, worker("d")) == 7  # shorter than a block
    assert uncached_tokens(CTX, index, None) == 1024


def test_load_snapshot_backlog_field_round_trips():
    snap = worker_pb2.LoadSnapshot(num_pending_prefill_tokens=12345)
    assert worker_pb2.LoadSnapshot.FromString(snap.SerializeToString()).num_pending_prefill_tokens == 12345
