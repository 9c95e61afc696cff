"""The prefill worker: serves Prefill (Prefill, ReleaseKV) and Worker.

Prefill computes the prompt's KV (reusing its own prefix cache) and samples the first token with
the request's own sampling parameters. Unless that token ends the request, the prompt's blocks
stay pinned under a lease and the reply carries a KV handle: this worker's UCX address, the block
ids and hashes, the layout fingerprint, the expiry and a one-time transfer token. The token is
bound to the decode worker the request names (decode_kv_address, required): only a pull from that
UCX client address is served. That decode worker pulls the blocks with it (which ends the lease),
or the gateway releases it, or it expires.
"""

from __future__ import annotations

import uuid

import grpc

from kvtransfer.ucx_runtime import set_data_plane_host
from kvtransfer.ucx_transport import KVTransportServer
from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.kv_handle import prefill_reply, prefill_request_problem
from services.engine.kv_handoff import Handoff
from services.worker.engine_worker import EngineWorker
from services.worker.translate import response_from_output

from .kv_leases import KVLeases


class PrefillService(EngineWorker, worker_pb2_grpc.PrefillServicer):
    role_service_name = worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name

    def add_role_servicer(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillServicer_to_server(self, server)

    def integrity_checks(self) -> list:
        return [lambda: self.leases.check_integrity()]

    async def start(self) -> None:
        await super().start()
        set_data_plane_host(self.host.config.host)  # UCX listens where gRPC does, not on every interface
        self.transport = KVTransportServer(self.host.kv_storage, on_pull_done=lambda token, ok: self.leases.pull_done(token, ok),
                                           on_drop=self.host.metrics.kv_pull_requests_dropped.inc)  # fmt: skip
        self.leases = KVLeases(self.host.engine, self.transport, self.host.config.kv_lease_seconds, self.host.metrics.kv_leases_expired.inc)
        await self.transport.start()

    def fill_registration(self, reg) -> None:
        super().fill_registration(reg)
        reg.ucx_address = self.transport.address

    async def close(self) -> None:
        if getattr(self, "leases", None) is not None:
            self.leases.close()
            await self.transport.close()
        await super().close()

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        problem = prefill_request_problem(request)
        if problem is not None:  # before the engine sees it: nothing is computed or pinned
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        # the request's own parameters, so the first token's finish (EOS, a stop, max_tokens=1) is
        # decided exactly as a single engine would
        if not request.request_id:
            request.request_id = uuid.uuid4().hex  # the id the engine pins the blocks under
        stream = await self.open_stream(request, context, Handoff.prefill())
        handed_over = False
        try:
            async for out in stream:
                if out.finished:
                    reply = self._reply(out, request)  # from here a lease owns the pinned blocks
                    handed_over = True
                    return reply
        finally:
            await stream.aclose()  # a cancelled Prefill aborts the request and frees its blocks
            if not handed_over:
                # cancelled after the engine pinned the prompt but before we read that output:
                # no lease will ever own those blocks, so let go of them now (a no-op otherwise;
                # the engine applies it after the abort, in order)
                self.host.engine.release_pinned(request.request_id)
        await context.abort(grpc.StatusCode.INTERNAL, "the engine ended the request without a token")

    def _reply(self, out, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        return prefill_reply(response_from_output(out, 0), out.num_cached_tokens, out.request_id, out.pinned_kv, self.leases.grant,
                             self.host.config.worker_id, self.transport.address, self.host.kv_layout.fingerprint, bound_to=request)  # fmt: skip

    async def ReleaseKV(self, request: worker_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext):
        return worker_pb2.ReleaseKVResponse(released=self.leases.release(request.request_id, request.transfer_token))
