"""The endpoint picker end to end: the real gateway (in-process) over a real etcd and simulated
workers that stream real KV events. A burst on one hot prefix stays on the warm worker for a few
requests, then spreads; the scheduling config changes live through etcd; the P/D decider counts
only the tokens the chosen decode worker lacks and respects the prefill queue limit; a session
header keeps a conversation on one worker."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from gateway.scheduling.live_config import delete_scheduling_document, put_scheduling_document
from loadtest.sim.fleet import SimFleet
from loadtest.sim.timing import TimingModel
from protos.tandem.v1 import gateway_pb2
from services.common.registry import make_client
from tests.helpers.sim_cluster import BS, FAST, InProcessGateway, check_all
from tests.helpers.waiting import eventually

SLOW = TimingModel().scaled(0.5)  # requests that stay in flight while a burst is being routed
AUTO = gateway_pb2.SERVING_MODE_AUTO


def unique_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 49152) for _ in range(n)]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {w: n - before.get(w, 0) for w, n in after.items() if n - before.get(w, 0)}


@pytest.fixture
async def picker(etcd, request):
    """(fleet, gateway): simulated workers as the test's marker asks, and a gateway seeing them all."""
    spec = getattr(request, "param", {})
    cluster = f"picker-{uuid.uuid4().hex[:8]}"
    fleet = SimFleet(etcd, cluster, num_decode=spec.get("decode", 4), num_prefill=spec.get("prefill", 0), timing=spec.get("timing", FAST), lease_ttl=3)
    await fleet.start()
    gateway = InProcessGateway(etcd, cluster, **spec.get("gateway", {}))
    try:
        await gateway.start()
        await eventually(lambda: gateway.connected(len(fleet)), "the gateway to connect to every simulated worker")
        yield fleet, gateway
        await check_all(fleet)
        gateway.service.pool.index.check_integrity()
        gateway.service.router.check_integrity()
    finally:
        await gateway.stop()
        await fleet.stop()


@pytest.mark.parametrize("picker", [{"decode": 4, "timing": SLOW}], indirect=True)
async def test_a_burst_on_one_hot_prefix_spreads_once_the_warm_worker_is_loaded(picker):
    fleet, gw = picker
    shared = unique_prompt(8 * BS, seed=1)  # an 8-block system prompt
    await gw.generate(shared + [7], max_tokens=1)
    held = await eventually(lambda: _warm(gw, 8), "the gateway to index the warm worker's 8 blocks")
    warm = held
    before = gw.routed()
    burst = [gw.generate(shared + unique_prompt(BS, seed=100 + i), max_tokens=16) for i in range(16)]
    await asyncio.wait_for(asyncio.gather(*burst), 60)
    routed = delta(gw.routed(), before)
    assert sum(routed.values()) == 16
    # weights 1 × prefix (8 of 9 blocks) vs 2 × queue depth (1 − depth / 8): the warm worker takes
    # requests until about 4 more are in flight there than on an idle one, then the burst spreads
    assert routed.get(warm, 0) >= 4, f"the warm worker should take the first requests: {routed}"
    assert routed.get(warm, 0) <= 10, f"the burst should not all land on the warm worker: {routed}"
    assert len(routed) == 4, f"every worker should take part of the burst: {routed}"


def _warm(gw: InProcessGateway, blocks: int) -> str | None:
    """The one decode worker holding at least `blocks` indexed blocks, once there is one."""
    index = gw.service.pool.index
    holders = [h.worker_id for h in gw.service.pool.registered("decode") if index.num_held(h.worker_id) >= blocks]
    return holders[0] if len(holders) == 1 else None


async def test_a_live_config_change_takes_effect_and_an_invalid_one_is_ignored(picker, etcd):
    fleet, gw = picker
    cluster = gw.config.cluster
    shared = unique_prompt(8 * BS, seed=2)
    await gw.generate(shared + [7], max_tokens=1)
    await eventually(lambda: _warm(gw, 8), "the gateway to index the warm worker's blocks")

    async def route_sequentially(n: int) -> dict[str, int]:
        before = gw.routed()
        for i in range(n):
            await gw.generate(shared + unique_prompt(BS, seed=200 + i), max_tokens=1)
        return delta(gw.routed(), before)

    assert len(await route_sequentially(4)) == 1  # prefix-aware: all on the warm worker

    await put_scheduling_document(etcd, cluster, 'policy = "round-robin"\n')
    await eventually(lambda: gw.service.router.policy == "round-robin", "the gateway to apply the etcd document")
    assert sorted((await route_sequentially(8)).values()) == [2, 2, 2, 2]  # each worker in turn

    client = make_client(etcd)
    try:
        await client.put(f"/tandem/{cluster}/config/scheduling".encode(), b'policy = "fastest"')
    finally:
        await client.close()
    await eventually(lambda: gw.service.live_config.num_rejected == 1, "the invalid document to be rejected")
    assert gw.service.router.policy == "round-robin"  # the last good config stays

    await delete_scheduling_document(etcd, cluster)
    await eventually(lambda: gw.service.router.policy == "prefix-aware", "the gateway to revert to its own settings")


@pytest.mark.parametrize(
    "picker", [{"decode": 2, "prefill": 1, "timing": TimingModel().scaled(0.2), "gateway": {"disagg_min_uncached_tokens": 256}}], indirect=True
)
async def test_the_pd_decider_counts_only_what_the_decode_worker_lacks(picker, etcd):
    fleet, gw = picker
    prompt = unique_prompt(32 * BS, seed=3)  # 512 tokens, cached nowhere
    first = await gw.generate(prompt, max_tokens=4, mode=AUTO)
    assert gw.pd_decisions() == {"disaggregated": 1}
    assert first[-1].usage.prompt_tokens == 512

    # the decode worker imported the prompt's blocks: the same prompt with a longer question lacks
    # only 16 tokens there, so it is served aggregated, from the cache, whatever its length
    await eventually(lambda: max(gw.service.pool.index.num_held(w.worker_id) for w in fleet.decode) >= 32, "the decode worker's imported blocks in the index")
    again = await gw.generate(prompt + unique_prompt(BS, seed=4), max_tokens=4, mode=AUTO)
    assert gw.pd_decisions() == {"disaggregated": 1, "below-threshold": 1}
    assert again[-1].usage.cached_prompt_tokens >= 512 - BS

    # a prefill queue limit of one token: only one of three concurrent long prompts is prefilled
    # there (the gateway counts its in-flight prompt tokens at decision time); the others are not
    # queued behind it but served aggregated
    await put_scheduling_document(etcd, gw.config.cluster, "[disaggregation]\nmin_uncached_tokens = 256\nprefill_max_pending_tokens = 1\n")
    await eventually(lambda: gw.service.router.config.disaggregation.prefill_max_pending_tokens == 1, "the new queue limit")
    await asyncio.wait_for(asyncio.gather(*(gw.generate(unique_prompt(32 * BS, seed=10 + i), max_tokens=4, mode=AUTO) for i in range(3))), 60)
    decisions = gw.pd_decisions()
    assert decisions["disaggregated"] == 2 and decisions["prefill-unavailable"] == 2, decisions


async def test_a_session_header_keeps_a_conversation_on_one_worker(picker):
    fleet, gw = picker
    before = gw.routed()
    for turn in range(6):  # unrelated prompts: only the session ties them together
        await gw.generate(unique_prompt(3 * BS, seed=300 + turn), max_tokens=1, session="conversation-1")
    assert len(delta(gw.routed(), before)) == 1

    before = gw.routed()
    for turn in range(12):  # without a session, idle workers tie and the tie-break spreads them
        await gw.generate(unique_prompt(3 * BS, seed=400 + turn), max_tokens=1)
    assert len(delta(gw.routed(), before)) >= 2
