"""EngineWorker: what the prefill and decode services share — one engine, the Worker service
(load and KV events) beside the role's own, and the start/registration/close the bootstrap calls.

When the engine thread dies, the worker answers UNAVAILABLE everywhere and `wait_failed()`
returns, which makes the bootstrap take it out of the cluster and exit (engine_failure.py)."""

from __future__ import annotations

import uuid

import grpc

from protos.tandem.v1 import worker_pb2_grpc
from services.common.config import ServiceConfig
from services.common.worker_servicer import WORKER_SERVICE_NAME, WorkerServicer
from services.engine.kv_handoff import Handoff

from .engine_failure import EngineFailure, EngineFailureGuard
from .engine_host import EngineHost
from .translate import sampling_from_proto


class EngineWorker:
    role_service_name: str  # the role's gRPC service, e.g. "tandem.v1.Decode"

    def __init__(self, config: ServiceConfig):
        self.host = EngineHost(config)
        self.metrics_registry = self.host.metrics.registry
        self.service_names = (self.role_service_name, WORKER_SERVICE_NAME)
        self.failure = EngineFailure(config.worker_id)
        self.interceptors = (EngineFailureGuard(self.failure),)  # installed by the bootstrap

    def add_role_servicer(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def add_to_server(self, server: grpc.aio.Server) -> None:
        self.add_role_servicer(server)
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(self.host.hub, [self.host.engine_check_integrity, *self.integrity_checks()]), server)

    def integrity_checks(self) -> list:
        """The role's own check_integrity() callables, beyond the engine's and the event log's."""
        return []

    async def start(self) -> None:
        await self.host.start()
        self.host.engine.on_death(self.failure.set)

    def mark_ready(self) -> None:
        """The engine is loaded and the role started: RPCs are served from now on (before, UNAVAILABLE)."""
        self.failure.ready = True

    async def wait_failed(self) -> str:
        """Return (what happened) once this worker can no longer serve: its engine thread died."""
        return await self.failure.wait()

    def fill_registration(self, reg) -> None:
        self.host.fill_registration(reg)

    async def close(self) -> None:
        await self.host.close()

    async def open_stream(self, request, context: grpc.aio.ServicerContext, handoff: Handoff | None = None):
        """Queue a worker request (prompt ids, sampling, cache salt) on the engine and return its
        output stream; aborts the RPC with INVALID_ARGUMENT, naming the field, when it cannot run."""
        request_id = request.request_id or uuid.uuid4().hex
        try:
            params = sampling_from_proto(request.sampling, self.host.max_model_len)
            return await self.host.generate(request_id, list(request.prompt_token_ids), params, request.cache_salt, handoff)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
