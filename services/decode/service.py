"""The decode worker: serves Decode.Generate (streaming) and Worker.

Aggregated mode: the worker prefills the prompt itself (reusing its prefix cache), then decodes,
streaming every step's tokens and text. Requests that carry a kv_handle (the prompt's KV computed
by a prefill worker) are the disaggregated flow; their transfer lands with KV transfer over UCX.
"""

from __future__ import annotations

import uuid

import grpc

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.config import ServiceConfig
from services.common.engine_host import EngineHost
from services.common.translate import response_from_output, sampling_from_proto
from services.common.worker_servicer import WORKER_SERVICE_NAME, WorkerServicer


class DecodeService(worker_pb2_grpc.DecodeServicer):
    service_names = (worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name, WORKER_SERVICE_NAME)

    def __init__(self, config: ServiceConfig):
        self.host = EngineHost(config)
        self.metrics_registry = self.host.metrics.registry

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeServicer_to_server(self, server)
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(self.host), server)

    async def start(self) -> None:
        await self.host.start()

    def fill_registration(self, reg) -> None:
        self.host.fill_registration(reg)

    async def close(self) -> None:
        await self.host.close()

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext):
        if request.HasField("kv_handle"):
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this decode worker cannot take a prefilled prompt's KV yet (kv_handle is set); send the request without kv_handle",
            )
        request_id = request.request_id or uuid.uuid4().hex
        try:
            params = sampling_from_proto(request.sampling, self.host.max_model_len)
            stream = await self.host.generate(request_id, list(request.prompt_token_ids), params, request.cache_salt)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        num_logprobs_sent = 0
        async for out in stream:
            yield response_from_output(out, num_logprobs_sent)
            num_logprobs_sent = len(out.logprobs)
