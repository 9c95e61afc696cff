"""The prefill worker: serves Prefill.Prefill and Worker.

Prefill computes the prompt's KV (reusing its own prefix cache), samples the first token with the
request's sampling parameters and returns it; the prompt's full blocks stay in this worker's
prefix cache. Handing the KV to a decode worker (the kv_handle) arrives with KV transfer.
"""

from __future__ import annotations

import uuid

import grpc

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.config import ServiceConfig
from services.common.engine_host import EngineHost
from services.common.translate import response_from_output, sampling_from_proto
from services.common.worker_servicer import WORKER_SERVICE_NAME, WorkerServicer


class PrefillService(worker_pb2_grpc.PrefillServicer):
    service_names = (worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name, WORKER_SERVICE_NAME)

    def __init__(self, config: ServiceConfig):
        self.host = EngineHost(config)
        self.metrics_registry = self.host.metrics.registry

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillServicer_to_server(self, server)
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(self.host), server)

    async def start(self) -> None:
        await self.host.start()

    def fill_registration(self, reg) -> None:
        self.host.fill_registration(reg)

    async def close(self) -> None:
        await self.host.close()

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            # the request's own parameters, so the first token's finish (EOS, a stop, max_tokens=1)
            # is decided exactly as decode would; the stream is closed after that token
            params = sampling_from_proto(request.sampling, self.host.max_model_len)
            stream = await self.host.generate(request_id, list(request.prompt_token_ids), params, request.cache_salt)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            async for out in stream:
                if out.new_token_ids or out.finished:
                    return worker_pb2.PrefillResponse(first=response_from_output(out, 0))
        finally:
            await stream.aclose()  # aborts the request unless it finished: its blocks go back to the cache
        await context.abort(grpc.StatusCode.INTERNAL, "the engine ended the request without a token")
