"""The gateway: the public Gateway.Generate stream, in front of tokenizers and decode workers.

    Generate: validate → Tokenize (text/chat) → check the length → hash the prompt's blocks
              → pick a decode worker (routing policy) → P/D decider: prefill elsewhere first?
              → [Prefill.Prefill, first token streamed] → Decode.Generate, streamed back

Two front doors, one request path: gRPC Generate and the OpenAI HTTP API (gateway/openai_api/) both
drive `generate()`, which counts the request in the metrics around `_generate`.

Deadlines: every downstream call gets the client's remaining time. Cancellation: when the client
goes away the handler is cancelled and the downstream call with it, so the worker aborts the
request and frees its KV blocks. Worker failures (gateway/decode_leg.py): a decode worker that fails
before it streamed anything is retried on another; one that fails mid-stream has its request
migrated to another (a continuation; max_migrations). A prefill worker that fails makes an AUTO
request fall back to aggregated serving. Every outcome feeds the pool's outlier detector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid

import grpc

from kvtransfer.block_hash import hash_blocks
from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2, worker_pb2
from services.common.config import ServiceConfig
from services.common.errors import RequestError, invalid, unavailable
from services.common.keepalive import Keepalive
from services.common.metrics import GatewayMetrics
from services.common.registry import workers_prefix
from services.common.telemetry import tracer
from services.common.tls import TlsFiles

from .api_keys import ApiKeys, KeyCheck
from .decode_leg import RETRYABLE_CODES, DecodeLeg
from .outlier_detection import OutlierDetectionConfig, OutlierDetector
from .pd_decider import PDDecision, decide, uncached_tokens
from .request_validation import RequestLimits, check_prompt_length, validate_request
from .scheduling.base import RequestContext
from .scheduling.live_config import LiveSchedulingConfig
from .scheduling.router import Router
from .scheduling.scheduling_config import DisaggregationConfig, SchedulingConfig, load_file
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    service_names = (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,)

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.metrics_registry = self.metrics.registry
        outliers = OutlierDetector(
            OutlierDetectionConfig(config.outlier_consecutive_failures, config.outlier_base_ejection_seconds,
                                   config.outlier_max_ejection_seconds, config.outlier_max_ejection_percent),
            on_eject=lambda handle, seconds: self.metrics.worker_ejections.labels(handle.worker_id, handle.role).inc(),
        )  # fmt: skip
        self.pool = WorkerPool(config.etcd, config.cluster, on_change=self._count_workers, outliers=outliers, tls=TlsFiles.from_config(config),
                               keepalive=Keepalive.from_config(config))  # fmt: skip
        self._rng = random.Random()
        base = SchedulingConfig(policy=config.routing_policy, disaggregation=DisaggregationConfig(min_uncached_tokens=config.disagg_min_uncached_tokens))
        if config.scheduling_config:
            base = load_file(config.scheduling_config, base)
        self.router = Router(base, self.pool.index, self._rng)
        self.decode_leg = DecodeLeg(self.pool, self.router, self.metrics, config.max_migrations, observe=self._observe_plugin)
        self.live_config = LiveSchedulingConfig(config.etcd, config.cluster, base, self.router.configure)
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget cleanups, held until done
        self._tokenizer_turn = 0
        self._num_in_flight = 0
        self.api_keys = ApiKeys.from_setting(config.api_keys)
        self.request_limits = RequestLimits.from_config(config)
        self.front_doors = ()
        if config.http_port:
            from .openai_api.server import OpenAIServer  # aiohttp is imported only where HTTP is served

            self.front_doors = (OpenAIServer(self, config),)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)

    async def start(self) -> None:
        await self.pool.start()
        self.live_config.start()
        await asyncio.wait_for(self.live_config.synced.wait(), 30)

    def fill_registration(self, reg) -> None:
        pass

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.live_config.stop()
        await self.pool.close()

    def _count_workers(self, pool: WorkerPool) -> None:
        for role in ("tokenizer", "prefill", "decode"):
            self.metrics.workers.labels(role).set(len(pool.registered(role)))

    # ---- Generate -------------------------------------------------------------------------------

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._authenticate(context)
        try:
            async for chunk in self.generate(request, context):
                yield chunk
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def _authenticate(self, context) -> None:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        check = self.api_keys.check(authorization if isinstance(authorization, str) else None)
        if check is KeyCheck.MISSING:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this gateway requires an API key: send the metadata `authorization: Bearer <key>`")
        if check is KeyCheck.INVALID:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key in the `authorization` metadata is not valid (expected `Bearer <key>`)")

    async def generate(self, request: gateway_pb2.GenerateRequest, context):
        """The one request path of both front doors: the request's chunks, counted in the metrics.

        `context` gives `time_remaining()` (seconds, or None: no deadline) and
        `invocation_metadata()` ((key, value) pairs, keys lower case: gRPC metadata or HTTP
        headers). Raises RequestError (its gRPC code says what went wrong). Closing the generator
        early, or cancelling its task, cancels every downstream call and frees the workers' KV."""
        start = time.perf_counter()
        code = "OK"
        limit = self.config.max_requests_in_flight
        if limit and self._num_in_flight >= limit:
            self.metrics.requests.labels(grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the gateway is serving its limit of {limit} requests (max_requests_in_flight); retry later"
            )
        self._num_in_flight += 1
        self.metrics.in_flight.inc()
        try:
            first = True
            # closed explicitly, so that when our consumer closes us early the workers' calls end now
            async with contextlib.aclosing(self._generate(request, context)) as stream:
                async for chunk in stream:
                    if first and chunk.token_ids:
                        self.metrics.time_to_first_token.observe(time.perf_counter() - start)
                        first = False
                    yield chunk
        except RequestError as e:
            code = e.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (GeneratorExit: closed early)
            code = "CANCELLED"
            raise
        finally:
            self._num_in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(code).inc()
            self.metrics.request_duration.observe(time.perf_counter() - start)

    def served_models(self) -> dict[str, int]:
        """The models the registered decode workers serve, with the smallest context among them."""
        models: dict[str, int] = {}
        for h in self.pool.registered("decode"):
            reg = h.registration
            models[reg.model] = min(models.get(reg.model, reg.max_model_len), reg.max_model_len)
        return models

    def _remaining(self, context) -> float | None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired at the gateway")
        return remaining

    async def _generate(self, request: gateway_pb2.GenerateRequest, context):
        validate_request(request, set(self.served_models()), self.request_limits)
        request_id = request.request_id or uuid.uuid4().hex
        decoders = self.pool.registered("decode")
        if not decoders:
            raise unavailable(
                f"no decode workers are registered (etcd prefix {workers_prefix(self.config.cluster)}decode/); start one with `tandem serve decode`"
            )
        prompt_ids = await self._prompt_token_ids(request, context)
        limit = self.config.max_prompt_tokens
        if limit and len(prompt_ids) > limit:
            raise invalid(f"prompt is {len(prompt_ids)} tokens but this gateway accepts at most {limit} (max_prompt_tokens); shorten the prompt")
        max_model_len = min(h.registration.max_model_len for h in decoders)
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.max_tokens = check_prompt_length(len(prompt_ids), request.sampling, max_model_len, self.config.default_max_tokens)
        worker_request = worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, cache_salt=request.cache_salt)
        route = self._routing_context(request, request_id, prompt_ids, decoders, context)
        decode, decision = self._schedule(request.mode, route)
        forced = request.mode == gateway_pb2.SERVING_MODE_DISAGGREGATED
        stream = (
            self._disaggregated(worker_request, context, route, decision, decode, forced)
            if decision.disaggregate
            else self._decode(worker_request, context, route, decode)
        )
        # counted from the decision (a disaggregated request's prefill included), so a burst
        # spreads; the prompt tokens it computes count in its prefill backlog until the first token
        backlog = 0 if decision.disaggregate else decision.num_uncached_tokens
        decode.acquire(backlog)
        try:
            async with contextlib.aclosing(stream):  # closed here when we are: its worker calls end now
                async for chunk in stream:
                    if backlog and chunk.token_ids:
                        decode.computed(backlog)
                        backlog = 0
                    yield chunk
        finally:
            decode.release(backlog)

    def _routing_context(self, request, request_id: str, prompt_ids: list[int], decoders, context) -> RequestContext:
        """What the scheduler needs to know of the request. The prompt's block hashes (hashed as
        the workers do: their model id, block size and the cache salt) when the routing policy or
        the P/D decider will look them up in the prefix index."""
        metadata = dict(context.invocation_metadata() or ())
        session = metadata.get(self.router.config.session_header, "")
        ctx = RequestContext(request_id, len(prompt_ids), model=request.model, session_id=session if isinstance(session, str) else "")
        may_disaggregate = request.mode != gateway_pb2.SERVING_MODE_AGGREGATED and bool(self.pool.registered("prefill"))
        if self.router.needs_block_hashes or may_disaggregate:
            layout = decoders[0].registration.kv_layout
            if layout.block_size:
                ctx.block_hashes = hash_blocks(prompt_ids, layout.block_size, layout.model_id, request.cache_salt or None)
                ctx.block_size = layout.block_size
        return ctx

    def _schedule(self, mode: int, route: RequestContext):
        """The decode worker (routing policy) and the P/D decision for it, timed and traced."""
        observe = self._observe_plugin
        with tracer().start_as_current_span("gateway.schedule") as span:
            t = time.perf_counter()
            workers = self.pool.workers.values()
            decode = self.router.pick(route, workers, observe=observe)
            if decode is None:
                raise unavailable(
                    f"no decode worker can take the request ({len(self.pool.registered('decode'))} registered, none ready for model {route.model or 'any'})"
                )
            decision = decide(mode, route, decode, workers, self.router, observe=observe)
            self.metrics.decision_latency.observe(time.perf_counter() - t)
            self.metrics.pd_decisions.labels(decision.reason).inc()
            span.set_attribute("tandem.decode_worker_id", decode.worker_id)
            span.set_attribute("tandem.pd_decision", decision.reason)
            span.set_attribute("tandem.uncached_tokens", decision.num_uncached_tokens)
            if decision.prefill is not None:
                span.set_attribute("tandem.prefill_worker_id", decision.prefill.worker_id)
        return decode, decision

    def _observe_plugin(self, plugin: str, seconds: float) -> None:
        self.metrics.plugin_latency.labels(plugin).observe(seconds)

    async def _disaggregated(
        self, worker_request: worker_pb2.WorkerGenerateRequest, context, route: RequestContext, decision: PDDecision, decode, forced: bool
    ):
        """Prefill on the decided prefill worker, stream its first token at once, then decode on
        `decode` (pulling only the blocks it lacks) with the KV handle.

        A prefill worker that fails (unreachable, or a worker error another worker would not
        repeat: RETRYABLE_CODES) makes an AUTO request fall back to aggregated serving (the client
        has seen nothing yet); a forced one fails with that status."""
        if not decode.registration.kv_client_address:  # a decode worker from before token binding: it cannot be handed KV
            if forced:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"decode worker {decode.worker_id} does not advertise kv_client_address "
                                   "(a version without KV token binding), so it cannot take a prefill worker's KV; upgrade it or use mode AUTO")  # fmt: skip
            async with contextlib.aclosing(self._decode(worker_request, context, route, decode)) as stream:
                async for chunk in stream:
                    yield chunk
            return
        handle = decision.prefill
        self.metrics.decisions.labels(handle.worker_id, "prefill").inc()
        num_prefill_tokens = uncached_tokens(route, self.pool.index, handle)
        prefill_request = worker_pb2.PrefillRequest(
            request_id=worker_request.request_id,
            prompt_token_ids=worker_request.prompt_token_ids,
            sampling=worker_request.sampling,
            cache_salt=worker_request.cache_salt,
            # the transfer token is bound to the decode worker chosen above: only it can pull the KV
            # (if the decode leg moves the request, the new worker recomputes the prompt)
            decode_worker_id=decode.worker_id,
            decode_kv_address=decode.registration.kv_client_address,
        )
        handle.acquire(num_prefill_tokens)
        try:
            reply = await handle.prefill_stub().Prefill(prefill_request, timeout=self._remaining(context))
            self.pool.record_outcome(handle, grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as e:
            self.pool.record_outcome(handle, e.code())
            if e.code() not in RETRYABLE_CODES or forced:
                raise RequestError(e.code(), e.details() or e.code().name) from None
            log.warning("prefill worker %s failed (%s: %s); serving %s aggregated", handle.worker_id, e.code().name, e.details(), worker_request.request_id)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                handle.mark_unreachable()
            self.metrics.worker_retries.labels("prefill", "fallback-aggregated").inc()
            reply = None
        finally:
            handle.release(num_prefill_tokens)
        if reply is None:
            async with contextlib.aclosing(self._decode(worker_request, context, route, decode)) as stream:
                async for chunk in stream:
                    yield chunk
            return
        yield reply.first  # the first token reaches the client before decode starts
        if reply.first.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            return
        worker_request.kv_handle.CopyFrom(reply.kv_handle)
        worker_request.first_token_id = reply.first.token_ids[0]
        try:
            decoding = self._decode(
                worker_request, context, route, decode, cached_prompt_tokens=reply.num_cached_tokens, streamed_token_ids=reply.first.token_ids
            )
            async with contextlib.aclosing(decoding) as stream:
                async for chunk in stream:
                    yield chunk
        finally:
            # normally the decode worker's pull has released the blocks already; when the request
            # ended before that (cancelled, failed, recomputed) this frees them now, not at expiry
            self._background(self._release_kv(handle, reply.kv_handle))

    async def _release_kv(self, handle, kv_handle) -> None:
        try:
            await handle.prefill_stub().ReleaseKV(
                worker_pb2.ReleaseKVRequest(request_id=kv_handle.request_id, transfer_token=kv_handle.transfer_token), timeout=5
            )
        except Exception as e:  # noqa: BLE001 - the handle expires on its own; nothing leaks
            log.info("could not release the KV of %s on %s: %s", kv_handle.request_id, handle.worker_id, e)

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prompt_token_ids(self, request, context) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            return list(request.token_ids.ids)
        tok_request = tokenizer_pb2.TokenizeRequest(text=request.text) if which == "text" else tokenizer_pb2.TokenizeRequest(chat=request.chat)
        tokenizers = self.pool.registered("tokenizer")
        if not tokenizers:
            raise unavailable(
                f"no tokenizer service is registered (etcd prefix {workers_prefix(self.config.cluster)}tokenizer/); start one with `tandem serve tokenizer`"
            )
        last_error = None
        for i in range(len(tokenizers)):  # round robin, moving on when one is unreachable
            handle = tokenizers[(self._tokenizer_turn + i) % len(tokenizers)]
            try:
                reply = await handle.tokenizer_stub().Tokenize(tok_request, timeout=self._remaining(context))
                self._tokenizer_turn += i + 1
                return list(reply.token_ids)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise RequestError(e.code(), e.details()) from None
                last_error = e
        raise unavailable(f"no tokenizer could be reached ({len(tokenizers)} registered): {last_error.details()}")

    def _decode(self, worker_request: worker_pb2.WorkerGenerateRequest, context, route: RequestContext, first_choice,
                cached_prompt_tokens: int | None = None, streamed_token_ids=()):  # fmt: skip
        """The decode leg (gateway/decode_leg.py): stream from `first_choice`, retry or migrate when
        a worker fails. `cached_prompt_tokens`: the prefill worker's count, which the usage reports
        for a disaggregated request; `streamed_token_ids`: its first token, already streamed."""
        return self.decode_leg.stream(worker_request, lambda: self._remaining(context), route, first_choice, cached_prompt_tokens, streamed_token_ids)

    # ---- ListWorkers ----------------------------------------------------------------------------

    async def ListWorkers(self, request, context):
        await self._authenticate(context)
        reply = gateway_pb2.ListWorkersResponse()
        for h in self.pool.workers.values():
            status = gateway_pb2.WorkerStatus(
                registration=h.registration, num_in_flight=h.num_in_flight, num_indexed_blocks=self.pool.index.num_held(h.worker_id)
            )
            if h.load is not None:
                status.load.CopyFrom(h.load)
            reply.workers.append(status)
        return reply
