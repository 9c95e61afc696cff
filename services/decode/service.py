"""The decode worker: serves Decode.Generate (streaming) and Worker.

Aggregated mode: the worker prefills the prompt itself (reusing its prefix cache), then decodes,
streaming every step's tokens and text. Requests that carry a kv_handle (the prompt's KV computed
by a prefill worker) are the disaggregated flow; their transfer lands with KV transfer over UCX.
"""

from __future__ import annotations

import grpc

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.engine_worker import EngineWorker
from services.common.translate import response_from_output


class DecodeService(EngineWorker, worker_pb2_grpc.DecodeServicer):
    role_service_name = worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name

    def add_role_servicer(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeServicer_to_server(self, server)

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext):
        if request.HasField("kv_handle"):
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this decode worker cannot take a prefilled prompt's KV yet (kv_handle is set); send the request without kv_handle",
            )
        stream = await self.open_stream(request, context)
        num_logprobs_sent = 0
        async for out in stream:
            yield response_from_output(out, num_logprobs_sent)
            num_logprobs_sent = len(out.logprobs)
