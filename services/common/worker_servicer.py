"""The Worker service every prefill and decode worker serves (real or simulated): its load, its
invariant checks, and a stream of load snapshots and KV cache events (replayed from a sequence
number after a reconnect)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc

from .watch_hub import SubscriberOverflow, WatchHub

WORKER_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, hub: WatchHub, checks: Sequence[Callable] = ()):
        """`checks`: check_integrity() callables (sync, or returning an awaitable) that raise
        AssertionError naming what is wrong: the engine's, the role's (leases)."""
        self.hub = hub
        self._checks = checks

    async def GetLoad(self, request, context):
        return self.hub.load_snapshot()

    async def CheckIntegrity(self, request, context):
        try:
            for check in (*self._checks, self.hub.kv_log.check_integrity):
                result = check()
                if asyncio.iscoroutine(result):
                    await result
        except AssertionError as e:
            return worker_pb2.CheckIntegrityResponse(ok=False, problem=str(e) or repr(e))
        return worker_pb2.CheckIntegrityResponse(ok=True)

    async def Watch(self, request, context):
        sub, first = self.hub.subscribe(request.last_sequence)
        try:
            for event in first:
                yield event
            while True:
                yield await sub.get()
        except SubscriberOverflow as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        finally:
            self.hub.unsubscribe(sub)
