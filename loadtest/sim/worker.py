"""SimWorker: one simulated prefill or decode worker — the real worker's protocol over a SimEngine.

    grpc.aio server on 127.0.0.1:<free port>
      tandem.v1.Prefill (Prefill, ReleaseKV) | tandem.v1.Decode (Generate)     the role's service
      tandem.v1.Worker (GetLoad, Watch, CheckIntegrity)                        loadtest/sim/host.py
      grpc.health.v1.Health, server reflection
    etcd: /tandem/<cluster>/workers/<role>/<id> → WorkerRegistration under its own lease

Start follows services/common/server.py: health NOT_SERVING → engine → registration → SERVING.
stop(): NOT_SERVING → revoke the lease (the gateway drops the worker at once) → drain the server
→ close the engine and leases; nothing is left running. restart() is a crash and a quick restart:
the server stops without a drain, the state is rebuilt empty (cache, event sequence back to 0),
the same port and worker id come back with a new started_unix_ms under a new lease, and only then
is the old lease revoked (the key has moved to the new one, so it never disappears).

Prefill: compute the prompt (prefix cache reused), sample the first token, pin the prompt's blocks
under a SimLease and return a KVHandle (block ids and hashes, token count, layout fingerprint,
expiry, random one-time token; ucx_address = this worker's gRPC address), bound to the decode
worker the request names (decode_kv_address required, as the real worker; a simulated decode
worker's kv_client_address is its gRPC address). Decode with a handle: the same checks as
services/decode/service.py (FAILED_PRECONDITION on a layout mismatch, before anything is
allocated; a handle bound to another decode worker is not pulled), allocate the prompt after this worker's own cached prefix, "pull" the
missing blocks (sleep TimingModel.pull_seconds), then call the prefill worker's ReleaseKV with the
token as a finished UCX pull would: released → the blocks are stored here (real `stored` events)
and decoding goes on from first_token_id; refused or unreachable → recompute here (or UNAVAILABLE
with policy "fail"). Bad requests get INVALID_ARGUMENT naming the field, as the real workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kvtransfer.layout import layout_fingerprint
from protos.tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.generate_many import GenerateManyStream
from services.common.kv_handle import kv_handle_problem, prefill_reply, prefill_request_problem
from services.common.registry import Registration, encode_registration, worker_key
from services.common.server import GRPC_OPTIONS, VERSION
from services.common.worker_servicer import WORKER_SERVICE_NAME, WorkerServicer

from .engine import SimEngine, SimOutput
from .host import SimHost
from .kv_cache import SimKVCache
from .leases import SimLeases
from .timing import TimingModel

log = logging.getLogger(__name__)

ROLE_SERVICES = {"prefill": worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name, "decode": worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name}
FINISH_REASONS = {None: common_pb2.FINISH_REASON_UNSPECIFIED, "stop": common_pb2.FINISH_REASON_STOP,
                  "length": common_pb2.FINISH_REASON_LENGTH, "abort": common_pb2.FINISH_REASON_ABORT}  # fmt: skip


@dataclass
class SimWorkerConfig:
    role: str  # prefill | decode
    worker_id: str
    etcd: str  # host:port
    cluster: str = "default"
    model: str = "default"  # the model name in the registration (the gateway checks requests against it)
    model_id: str = ""  # the block-hash seed; default: model (as the real workers)
    block_size: int = 16
    num_kv_blocks: int = 1456  # what 1 GiB (the workers' default kv_cache_gb) holds of SmolLM2-135M fp32
    max_model_len: int = 8192
    vocab_size: int = 49152
    timing: TimingModel = field(default_factory=TimingModel)
    # the KV layout the fingerprint covers: SmolLM2-135M's dims (so a block is the 720 KiB the pull
    # time is calibrated for) with a dtype no real worker has, so real and simulated workers never
    # exchange blocks (a mix fails with FAILED_PRECONDITION instead of a doomed UCX pull)
    dtype: str = "float32-simulated"
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, kept across restart()
    lease_ttl: int = 10
    kv_lease_seconds: float = 30.0
    kv_transfer_timeout: float = 10.0
    kv_transfer_policy: str = "recompute"  # or "fail"
    drain_timeout: float = 5.0

    def __post_init__(self):
        if self.role not in ROLE_SERVICES:
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if self.kv_transfer_policy not in ("recompute", "fail"):
            raise ValueError(f"kv_transfer_policy must be recompute or fail, got {self.kv_transfer_policy!r}")
        self.model_id = self.model_id or self.model


def sampling_from_proto(p: common_pb2.SamplingParams, max_tokens_default: int) -> tuple[int, list[int]]:
    """(max_tokens, stop_token_ids); ValueError naming the field for what the real engine's
    SamplingParams rejects. Temperature, top-p/k and seed are checked but do not change the output."""
    max_tokens = p.max_tokens if p.HasField("max_tokens") else max_tokens_default
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if p.HasField("temperature") and not p.temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {p.temperature!r}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p!r}")
    if p.HasField("top_k") and (p.top_k < -1 or p.top_k == 0):
        raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {p.top_k!r}")
    if p.HasField("logprobs") and not 0 <= p.logprobs <= 20:
        raise ValueError(f"logprobs must be an integer in [0, 20], got {p.logprobs!r}")
    if any(not s for s in p.stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {list(p.stop)!r}")
    return max_tokens, list(p.stop_token_ids)


def response_from_output(out: SimOutput) -> common_pb2.GenerateResponse:
    """One engine output → one stream chunk, shaped as the real workers' (usage on the last)."""
    resp = common_pb2.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids, finish_reason=FINISH_REASONS[out.finish_reason])
    if out.stop_token_id is not None:
        resp.stop_token_id = out.stop_token_id
    if out.finished:
        resp.usage.CopyFrom(
            common_pb2.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens, cached_prompt_tokens=out.num_cached_tokens)
        )
    return resp


class SimWorker(worker_pb2_grpc.PrefillServicer, worker_pb2_grpc.DecodeServicer):
    """One simulated worker. start() / stop() / restart(); event-loop only."""

    def __init__(self, config: SimWorkerConfig):
        self.config = config
        c = config
        self.layout = common_pb2.KVLayout(
            model_id=c.model_id, dtype=c.dtype, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, block_size=c.block_size,
            fingerprint=layout_fingerprint(c.model_id, c.dtype, c.num_layers, c.num_kv_heads, c.head_dim, c.block_size),
        )  # fmt: skip
        self.port = c.port
        self.registration: common_pb2.WorkerRegistration | None = None
        self.num_restarts = 0
        self._server: grpc.aio.Server | None = None
        self._etcd: Registration | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}  # prefill workers this decode worker releases KV on
        self._new_state()

    def _new_state(self) -> None:
        c = self.config
        self.cache = SimKVCache(c.num_kv_blocks, c.block_size, c.model_id)
        self.engine = SimEngine(self.cache, c.timing, c.max_model_len, c.vocab_size)
        self.host = SimHost(c.worker_id, self.engine)
        self.leases = SimLeases(self.engine, c.kv_lease_seconds)
        self.health = HealthServicer()

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def key(self) -> str:
        return worker_key(self.config.cluster, self.role, self.worker_id)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, register_timeout: float = 30.0) -> None:
        """Serve on a free port (the same one after a restart), start the engine, register in etcd,
        then report SERVING. Raises (and leaves nothing running) when etcd cannot be reached."""
        names = (ROLE_SERVICES[self.role], WORKER_SERVICE_NAME)
        server = self._server = grpc.aio.server(options=GRPC_OPTIONS)
        if self.role == "prefill":
            worker_pb2_grpc.add_PrefillServicer_to_server(self, server)
        else:
            worker_pb2_grpc.add_DecodeServicer_to_server(self, server)
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(self.host, [self.host.check_integrity, self.leases.check_integrity]), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        await self._set_health(names, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.port}")
        await server.start()
        self.engine.start()
        try:
            self.registration = self._registration()
            self._etcd = Registration(self.config.etcd, self.key, encode_registration(self.registration), self.config.lease_ttl)
            await self._etcd.start(register_timeout)
        except BaseException:
            self._etcd = None
            await self._stop_serving(grace=None)
            raise
        await self._set_health(names, health_pb2.HealthCheckResponse.SERVING)

    def _registration(self) -> common_pb2.WorkerRegistration:
        c = self.config
        return common_pb2.WorkerRegistration(
            worker_id=c.worker_id, role=c.role, grpc_address=self.address, ucx_address=self.address.encode(), model=c.model,
            kv_layout=self.layout, block_size=c.block_size, num_kv_blocks=c.num_kv_blocks, max_num_seqs=c.timing.max_num_seqs,
            max_model_len=c.max_model_len, started_unix_ms=int(time.time() * 1000), version=f"{VERSION}+sim",
            kv_client_address=self.address.encode() if c.role == "decode" else b"",  # the identity handles are bound to
        )  # fmt: skip

    async def _set_health(self, names, status) -> None:
        for name in ("", *names):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Graceful: NOT_SERVING → revoke the lease → drain → close everything. Idempotent."""
        if self._server is None:
            return
        await self._set_health((ROLE_SERVICES[self.role], WORKER_SERVICE_NAME), health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._etcd is not None:
            await self._etcd.stop()
            self._etcd = None
        await self._stop_serving(grace=self.config.drain_timeout)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _stop_serving(self, grace: float | None) -> None:
        await self._server.stop(grace)
        self._server = None
        self.leases.close()
        await self.engine.close()

    async def restart(self) -> None:
        """A crash and a quick restart: no drain, empty state, same port and id, new started_unix_ms."""
        old = self._etcd
        self._etcd = None
        await self._stop_serving(grace=None)
        self._new_state()
        self.num_restarts += 1
        try:
            await self.start()
        finally:  # the key now belongs to the new lease, so revoking the old one keeps it (if start failed: the worker is gone)
            if old is not None:
                await old.stop()

    # ---- requests -------------------------------------------------------------------------------

    async def _open(self, request, context, **handoff):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            max_tokens, stop_ids = sampling_from_proto(request.sampling, self.config.max_model_len)
            return self.engine.add_request(request_id, list(request.prompt_token_ids), max_tokens, request.cache_salt, stop_ids, **handoff)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Prefill(self, request: worker_pb2.PrefillRequest, context):
        problem = prefill_request_problem(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        stream = await self._open(request, context, prefill_only=True)
        try:
            async for out in stream:
                if out.finished:
                    return self._prefill_reply(out, request)
        finally:
            await stream.aclose()  # cancelled: the request is aborted and its blocks freed
        await context.abort(grpc.StatusCode.INTERNAL, "the engine ended the request without a token")

    def _prefill_reply(self, out: SimOutput, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        # the handle names its decode worker; the simulated "pull" (ReleaseKV) carries no identity, so
        # the binding is enforced on the decode side only (_pull)
        return prefill_reply(response_from_output(out), out.num_cached_tokens, out.request_id, out.pinned, lambda pinned, _peer: self.leases.grant(pinned),
                             self.worker_id, self.address.encode(), self.layout.fingerprint, bound_to=request)  # fmt: skip

    async def ReleaseKV(self, request: worker_pb2.ReleaseKVRequest, context):
        return worker_pb2.ReleaseKVResponse(released=self.leases.release(request.request_id, request.transfer_token))

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context):
        if request.HasField("kv_handle"):
            stream = await self._open_disaggregated(request, context)
        else:
            stream = await self._open(request, context)
        try:
            async for out in stream:
                yield response_from_output(out)
        finally:  # the client went away (or the handler was cancelled): the request is aborted
            await stream.aclose()

    async def GenerateMany(self, controls, context):
        """The gateway's requests over one stream, as a real decode worker serves them."""
        async for batch in GenerateManyStream(self.Generate).serve(controls):
            yield batch

    async def _open_disaggregated(self, request: worker_pb2.WorkerGenerateRequest, context):
        handle, mine = request.kv_handle, self.layout
        problem = kv_handle_problem(request, mine)
        if problem is not None:
            await context.abort(*problem)
        stream = await self._open(request, context, output_token_ids=[request.first_token_id], import_kv=True)
        try:
            target = await anext(stream)
            if not target.recompute:
                ok = await self._pull(handle, target.num_missing_blocks, context)
                self.engine.complete_kv_import(target.request_id, ok)
        except BaseException:  # cancelled or failed mid-pull: the engine drops the request and its blocks
            await stream.aclose()
            raise
        return stream

    async def _pull(self, handle: common_pb2.KVHandle, num_blocks: int, context) -> bool:
        """Simulate pulling `num_blocks` blocks, then present the token as the real pull does (here:
        ReleaseKV on the prefill worker). True when the blocks are "here"."""
        if num_blocks == 0:  # this worker's prefix cache held the whole prompt; the gateway releases the handle
            return True
        if handle.decode_kv_address and handle.decode_kv_address != self.address.encode():  # bound to another decode worker
            return await self._pull_failed(handle, f"the KV handle is bound to decode worker {handle.decode_worker_id}, not this one", context)
        try:
            async with asyncio.timeout(self.config.kv_transfer_timeout):
                await asyncio.sleep(self.config.timing.pull_seconds(num_blocks))
                stub = worker_pb2_grpc.PrefillStub(self._channel(handle.ucx_address.decode()))
                reply = await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=handle.request_id, transfer_token=handle.transfer_token))
            if reply.released:
                return True
            problem = "the prefill worker refused the transfer token (expired, reused or wrong)"
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            problem = f"the prefill worker could not be reached: {e}"
        return await self._pull_failed(handle, problem, context)

    async def _pull_failed(self, handle: common_pb2.KVHandle, problem: str, context) -> bool:
        """The pull policy: UNAVAILABLE (policy "fail") or False (recompute here)."""
        if self.config.kv_transfer_policy == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer from {handle.prefill_worker_id} failed: {problem}")
        log.info("KV pull of %s from %s failed (%s); recomputing", handle.request_id, handle.prefill_worker_id, problem)
        return False

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return channel
