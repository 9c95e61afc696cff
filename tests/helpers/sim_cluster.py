"""Simulated workers behind an in-process gateway, for the gateway's integration tests: the real
GatewayService on a grpc.aio server, a real etcd (the `etcd` fixture in conftest) and a SimFleet."""

from __future__ import annotations

import grpc

from gateway.service import GatewayService
from loadtest.sim.fleet import SimFleet
from loadtest.sim.timing import TimingModel
from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.config import ServiceConfig
from services.common.registry import decode_registration, make_client, workers_prefix
from tandem.launcher import free_port

BS = 16
FAST = TimingModel().scaled(0.05)  # the calibrated model, 20× faster: real sleeps, short tests


class InProcessGateway:
    """The real GatewayService on a grpc.aio server in this process (no registration of its own)."""

    def __init__(self, etcd: str, cluster: str, policy: str = "prefix-aware", **settings):
        """`settings`: more ServiceConfig fields of the gateway (e.g. disagg_min_uncached_tokens)."""
        self.config = ServiceConfig(role="gateway", etcd=etcd, cluster=cluster, routing_policy=policy, port=free_port(), metrics_port=0, **settings)
        self.service = GatewayService(self.config)
        self.server = grpc.aio.server()
        self.service.add_to_server(self.server)
        self.server.add_insecure_port(self.config.bind_address)
        self.channel = grpc.aio.insecure_channel(self.config.bind_address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    async def start(self) -> None:
        await self.server.start()
        await self.service.start()

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.service.close()

    async def generate(self, ids: list[int], max_tokens: int, mode=gateway_pb2.SERVING_MODE_AGGREGATED, session: str = "") -> list[common_pb2.GenerateResponse]:
        request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(max_tokens=max_tokens), mode=mode)
        metadata = (("x-session-id", session),) if session else None
        return [chunk async for chunk in self.stub.Generate(request, timeout=30, metadata=metadata)]

    def routed(self) -> dict[str, int]:
        """Decode requests routed so far, by worker id (from the gateway's decision counter)."""
        counts: dict[str, int] = {}
        for metric in self.service.metrics.registry.collect():
            if metric.name == "tandem_routing_decisions":
                for sample in metric.samples:
                    if sample.name.endswith("_total") and sample.labels["policy"] != "prefill":
                        counts[sample.labels["worker_id"]] = counts.get(sample.labels["worker_id"], 0) + int(sample.value)
        return counts

    def pd_decisions(self) -> dict[str, int]:
        """P/D decisions so far, by reason."""
        return {
            sample.labels["reason"]: int(sample.value)
            for metric in self.service.metrics.registry.collect() if metric.name == "tandem_pd_decisions"
            for sample in metric.samples if sample.name.endswith("_total")
        }  # fmt: skip

    async def indexed(self) -> dict[str, int]:
        reply = await self.stub.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
        return {w.registration.worker_id: w.num_indexed_blocks for w in reply.workers}

    def connected(self, n: int) -> bool:
        return sum(1 for h in self.service.pool.workers.values() if h.connected) == n


async def keys(etcd: str, cluster: str) -> dict[str, common_pb2.WorkerRegistration]:
    client = make_client(etcd)
    try:
        reply = await client.get_prefix(workers_prefix(cluster).encode())
        return {kv.key.decode(): decode_registration(kv.value) for kv in reply.kvs}
    finally:
        await client.close()


async def check_all(fleet: SimFleet) -> None:
    for w in fleet.workers:
        async with grpc.aio.insecure_channel(w.address) as ch:
            reply = await worker_pb2_grpc.WorkerStub(ch).CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=5)
        assert reply.ok, f"{w.worker_id}: {reply.problem}"


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]
