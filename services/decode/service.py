"""The decode worker: serves Decode.Generate (streaming) and Worker.

Aggregated: the worker prefills the prompt itself (reusing its prefix cache), then decodes.
Disaggregated (the request carries a prefill worker's KV handle and first token): the worker
checks the layout fingerprint before any byte moves, allocates the prompt's blocks after its own
cached prefix, pulls only the missing blocks over UCX with the handle's one-time token, and then
decodes from the first token on. The token is bound to the decode worker the gateway chose (this
worker's kv_client_address, from its etcd registration): a handle bound to another worker (the
gateway moved the request after prefill) is not pulled at all — the prefill worker would drop the
pull unanswered — and counts as a failed pull at once. A failed or timed-out pull recomputes the
prompt here (policy `recompute`) or fails the request with UNAVAILABLE (policy `fail`); either way
nothing is held.
Migrated (the request carries resume_token_ids: another decode worker died mid-stream): the worker
computes prompt + those tokens as if it had generated them (nothing of them is streamed again)
and continues the generation where the dead worker stopped.
"""

from __future__ import annotations

import time

import grpc

from kvtransfer.ucx_runtime import set_data_plane_host
from kvtransfer.ucx_transport import KVTransferError, KVTransportClient
from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.generate_many import GenerateManyStream
from services.common.kv_handle import kv_handle_problem
from services.common.telemetry import tracer
from services.engine.kv_handoff import Handoff
from services.worker.engine_failure import is_engine_death
from services.worker.engine_worker import EngineWorker
from services.worker.translate import response_from_output


class DecodeService(EngineWorker, worker_pb2_grpc.DecodeServicer):
    role_service_name = worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name

    def add_role_servicer(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeServicer_to_server(self, server)

    async def start(self) -> None:
        await super().start()
        set_data_plane_host(self.host.config.host)  # UCX listens where gRPC does, not on every interface
        self.transport = KVTransportClient(self.host.kv_storage, on_channel_pull=self.host.metrics.kv_channel_pulls.inc)
        await self.transport.start()

    def fill_registration(self, reg) -> None:
        super().fill_registration(reg)
        reg.kv_client_address = self.transport.address  # prefill workers bind the KV they hand us to it

    async def close(self) -> None:
        if getattr(self, "transport", None) is not None:
            await self.transport.close()
        await super().close()

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext):
        if request.HasField("kv_handle"):
            stream = await self._open_disaggregated(request, context)
        elif request.resume_token_ids:
            stream = await self._open_resumed(request, context)
        else:
            stream = await self.open_stream(request, context)
        num_logprobs_sent = 0
        async for out in stream:
            yield response_from_output(out, num_logprobs_sent)
            num_logprobs_sent = len(out.logprobs)

    async def GenerateMany(self, controls, context: grpc.aio.ServicerContext):
        """Many Generate calls over one stream, one message per engine step (services/common/generate_many.py)."""
        async for batch in GenerateManyStream(self.Generate, self.failure, is_engine_death).serve(controls):
            yield batch

    async def _open_resumed(self, request: worker_pb2.WorkerGenerateRequest, context):
        problem = resume_problem(request, self.host.vocab_size, self.host.max_model_len)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return await self.open_stream(request, context, Handoff.resume(request.resume_token_ids))

    async def _open_disaggregated(self, request: worker_pb2.WorkerGenerateRequest, context):
        problem = kv_handle_problem(request, self.host.kv_layout)
        if problem is None and request.first_token_id >= self.host.vocab_size:
            problem = (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"first_token_id {request.first_token_id} is outside the vocabulary [0, {self.host.vocab_size})",
            )
        if problem is not None:
            await context.abort(*problem)
        stream = await self.open_stream(request, context, Handoff.import_kv_after(request.first_token_id))
        try:
            target = await anext(stream)
            if not target.recompute:
                ok = await self._pull(request, target, context)
                self.host.engine.complete_kv_import(target.request_id, ok)
        except BaseException:  # cancelled or failed mid-pull: the engine drops the request and its blocks
            await stream.aclose()
            raise
        return stream

    async def _pull(self, request, target, context) -> bool:
        """Pull the blocks this worker lacks; True when they arrived. Policy `fail` aborts the RPC instead of returning False."""
        handle = request.kv_handle
        src = list(handle.block_ids[target.first_missing_block :])
        dst = list(target.missing_block_ids)
        if not dst:  # this worker's prefix cache held the whole prompt; the gateway releases the handle
            return True
        attrs = {"tandem.request_id": target.request_id, "tandem.kv.blocks": len(dst), "tandem.kv.cached_blocks": target.first_missing_block,
                 "tandem.kv.prefill_worker": handle.prefill_worker_id}  # fmt: skip
        with tracer().start_as_current_span("kv.pull", attributes=attrs) as span:
            t0 = time.perf_counter()
            try:
                if handle.decode_kv_address and handle.decode_kv_address != self.transport.address:  # empty: a prefill worker before binding
                    raise KVTransferError(f"the KV handle is bound to decode worker {handle.decode_worker_id or '(unnamed)'}, not this one")
                path = await self.transport.pull(handle.ucx_address, handle.transfer_token, src, dst, timeout=self.host.config.kv_transfer_timeout)
                seconds = time.perf_counter() - t0
                m = self.host.metrics
                m.kv_pulls.labels(path=path).inc()
                m.kv_pull_blocks.inc(len(dst))
                m.kv_pull_bytes.inc(len(dst) * self.host.bytes_per_block)
                m.kv_pull_seconds.observe(seconds)
                span.set_attribute("tandem.kv.seconds", seconds)
                span.set_attribute("tandem.kv.path", path)
                return True
            except KVTransferError as e:
                self.host.metrics.kv_pull_failures.inc()
                span.record_exception(e)
                if self.host.config.kv_transfer_policy == "fail":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer from {handle.prefill_worker_id} failed: {e}")
                span.set_attribute("tandem.kv.recompute", True)
                return False


def resume_problem(request: worker_pb2.WorkerGenerateRequest, vocab_size: int, max_model_len: int) -> str | None:
    """Why a migrated request's resume_token_ids cannot run here (None: they can). The engine
    would feed them to the model, so every id must be in the vocabulary."""
    if request.HasField("kv_handle"):
        return "resume_token_ids cannot be combined with kv_handle: a migrated request is computed here from its tokens"
    resume = request.resume_token_ids
    for i, t in enumerate(resume):
        if t >= vocab_size:
            return f"resume_token_ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})"
    total = len(request.prompt_token_ids) + len(resume)
    if total >= max_model_len:
        return f"prompt + resume_token_ids is {total} tokens but the context (max_model_len) is {max_model_len}; nothing is left to generate"
    if request.sampling.HasField("max_tokens") and len(resume) >= request.sampling.max_tokens:
        return f"resume_token_ids holds {len(resume)} tokens, already max_tokens ({request.sampling.max_tokens}); nothing is left to generate"
    return None
