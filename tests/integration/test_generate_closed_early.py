"""GatewayService.generate() closed early — what the HTTP front door does when its client leaves
while a prompt's chunks wait to be written — ends every worker's call at once: the real gateway
in-process over simulated workers, whose KV pools must be empty again long before the request
could have finished."""

from __future__ import annotations

import uuid

import grpc
import pytest

from gateway.openai_api.choices import HttpCallContext
from loadtest.sim.fleet import SimFleet
from loadtest.sim.timing import TimingModel
from protos.tandem.v1 import common_pb2, gateway_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.sim_cluster import InProcessGateway, check_all
from tests.helpers.waiting import eventually

SLOW = TimingModel().scaled(0.5)  # ~10 ms a decode step: 1,000 tokens would take ~10 s


async def used_blocks(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        load = await worker_pb2_grpc.WorkerStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    return load.num_used_blocks + load.num_requests_running + load.num_requests_waiting


@pytest.mark.parametrize("mode", [gateway_pb2.SERVING_MODE_AGGREGATED, gateway_pb2.SERVING_MODE_DISAGGREGATED], ids=["aggregated", "disaggregated"])
async def test_closing_generate_early_frees_every_workers_kv(etcd, mode):
    cluster = f"close-{uuid.uuid4().hex[:8]}"
    fleet = SimFleet(etcd, cluster, num_decode=1, num_prefill=1, timing=SLOW, lease_ttl=3)
    await fleet.start()
    gateway = InProcessGateway(etcd, cluster)
    try:
        await gateway.start()
        await eventually(lambda: gateway.connected(len(fleet)), "the gateway to connect to the simulated workers")
        request = gateway_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=list(range(100, 200))), mode=mode,
            sampling=common_pb2.SamplingParams(max_tokens=1000, ignore_eos=True),
        )  # fmt: skip
        stream = gateway.service.generate(request, HttpCallContext({"X-Session-Id": "s1"}))
        await anext(stream)
        await anext(stream)  # decode is streaming: it holds the prompt's blocks
        decode = next(w for w in fleet.workers if w.role == "decode")
        assert await used_blocks(decode.address) > 0
        await stream.aclose()
        for w in fleet.workers:
            await eventually(lambda a=w.address: _idle(a), f"{w.worker_id} to hold no request and no block", timeout=3)
        await check_all(fleet)
        assert gateway.service.num_in_flight == 0
    finally:
        await gateway.stop()
        await fleet.stop()


async def _idle(address: str) -> bool:
    return await used_blocks(address) == 0
