"""The prefill worker: serves Prefill.Prefill and Worker.

Prefill computes the prompt's KV (reusing its own prefix cache), samples the first token with the
request's sampling parameters and returns it; the prompt's full blocks stay in this worker's
prefix cache. Handing the KV to a decode worker (the kv_handle) arrives with KV transfer.
"""

from __future__ import annotations

import grpc

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.engine_worker import EngineWorker
from services.common.translate import response_from_output


class PrefillService(EngineWorker, worker_pb2_grpc.PrefillServicer):
    role_service_name = worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name

    def add_role_servicer(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillServicer_to_server(self, server)

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        # the request's own parameters, so the first token's finish (EOS, a stop, max_tokens=1) is
        # decided exactly as decode would; the stream is closed after that token
        stream = await self.open_stream(request, context)
        try:
            async for out in stream:
                if out.new_token_ids or out.finished:
                    return worker_pb2.PrefillResponse(first=response_from_output(out, 0))
        finally:
            await stream.aclose()  # aborts the request unless it finished: its blocks go back to the cache
        await context.abort(grpc.StatusCode.INTERNAL, "the engine ended the request without a token")
