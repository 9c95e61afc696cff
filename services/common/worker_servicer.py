"""The Worker service every prefill and decode worker serves: its load, and a stream of load
snapshots and KV cache events (replayed from a sequence number after a reconnect)."""

from __future__ import annotations

import grpc

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc

from .engine_host import EngineHost, SubscriberOverflow

WORKER_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, host: EngineHost, extra_checks=()):
        self.host = host
        self._extra_checks = extra_checks  # more check_integrity() callables of the role (leases)

    async def GetLoad(self, request, context):
        return self.host.load_snapshot()

    async def CheckIntegrity(self, request, context):
        try:
            await self.host.engine.check_integrity_live()
            self.host.kv_log.check_integrity()
            for check in self._extra_checks:
                check()
        except AssertionError as e:
            return worker_pb2.CheckIntegrityResponse(ok=False, problem=str(e) or repr(e))
        return worker_pb2.CheckIntegrityResponse(ok=True)

    async def Watch(self, request, context):
        sub, first = self.host.subscribe(request.last_sequence)
        try:
            for event in first:
                yield event
            while True:
                yield await sub.get()
        except SubscriberOverflow as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        finally:
            self.host.unsubscribe(sub)
