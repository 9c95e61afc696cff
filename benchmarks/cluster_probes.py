"""What the gateway and etcd say about a cluster's workers: for the reliability benchmark and the tests that kill and restart them."""

from __future__ import annotations

import asyncio

import grpc

from protos.tandem.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.registry import decode_registration, make_client, workers_prefix


def routed_workers(gateway_address: str, role: str = "decode") -> dict[str, gateway_pb2.WorkerStatus]:
    """worker id → the gateway's status of it (registration, in-flight, indexed blocks), for `role`."""
    with grpc.insecure_channel(gateway_address) as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
    return {w.registration.worker_id: w for w in reply.workers if w.registration.role == role}


def in_flight(gateway_address: str, role: str = "decode") -> dict[str, int]:
    """worker id → requests the gateway has in flight there."""
    return {name: w.num_in_flight for name, w in routed_workers(gateway_address, role).items()}


def registered_workers(etcd_endpoint: str, cluster: str = "default") -> dict[str, int]:
    """worker id → started_unix_ms of the process registered in etcd ({} when etcd is unreachable)."""

    async def read():
        client = make_client(etcd_endpoint)
        try:
            got = await client.get_prefix(workers_prefix(cluster).encode())
            return {(reg := decode_registration(kv.value)).worker_id: reg.started_unix_ms for kv in got.kvs}
        finally:
            await client.close()

    try:
        return asyncio.run(read())
    except Exception:  # noqa: BLE001 - etcd down: nothing readable
        return {}


def back_in_routing(gateway_address: str, etcd_endpoint: str, name: str, role: str, after_ms: int) -> bool:
    """True once a process of `name` started after `after_ms` is registered in etcd and the gateway
    routes to it: it knows the new registration and the worker's Watch stream answered (its load)."""
    try:
        routed = routed_workers(gateway_address, role).get(name)
    except grpc.RpcError:
        return False
    if routed is None or routed.registration.started_unix_ms <= after_ms or not routed.HasField("load"):
        return False
    return registered_workers(etcd_endpoint).get(name, 0) > after_ms
