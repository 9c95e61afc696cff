"""The request path of both front doors (gRPC Generate and the OpenAI HTTP API), top to bottom:

    admit        gateway/admission.py      RESOURCE_EXHAUSTED past max_requests_in_flight
    validate     gateway/request_validation.py   INVALID_ARGUMENT naming the field
    tokenize     gateway/tokenize_step.py  text/chat → token ids on a tokenizer; max_prompt_tokens
    fit          the prompt + max_tokens within the decode workers' context (max_model_len)
    route        gateway/routing_step.py   decode worker (routing policy) + P/D decision
    prefill leg  gateway/prefill_leg.py    disaggregated: first token + KV handle, streamed at once
    decode leg   gateway/decode_leg.py     the rest, retried or migrated when a worker fails

Deadlines: every downstream call gets the client's remaining time. Cancellation: closing the
stream (or cancelling its task) closes every leg, so the workers abort the request and free its KV.
The chosen decode worker counts the request (WorkerHandle.in_flight) from the decision to the end,
with the prompt tokens it computes itself in its backlog until the first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import grpc

from protos.tandem.v1 import common_pb2, gateway_pb2, worker_pb2
from services.common.errors import RequestError, unavailable
from services.common.registry import workers_prefix

from .admission import Admission
from .decode_leg import DecodeLeg
from .prefill_leg import PrefillLeg
from .request_validation import RequestLimits, check_prompt_length, validate_request
from .routing_step import Route, RoutingStep
from .tokenize_step import TokenizeStep

# How long a request waits for a registered decode worker whose Watch stream has not answered yet
# (just started, or restarted: etcd told us of it a moment before its stream is up; most of a
# second under load). Covers the Watch retry backoff (worker_pool.WATCH_RETRY_S, up to 1 s between
# tries) and a restarted worker's first answer; past it, the request fails UNAVAILABLE as before.
DECODE_CONNECT_WAIT_S = 5.0


def time_left(context) -> float | None:
    """The client's remaining seconds (None: no deadline); RequestError(DEADLINE_EXCEEDED) when none."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired at the gateway")
    return remaining


class RequestPath:
    """admit → tokenize → route → prefill leg → decode leg, over one pool and router."""

    def __init__(self, config, pool, router, metrics):
        self.config, self.pool, self.metrics = config, pool, metrics
        self.limits = RequestLimits.from_config(config)
        self.admission = Admission(config.max_requests_in_flight, metrics)
        self.tokenize = TokenizeStep(pool, config.cluster, config.max_prompt_tokens)
        self.routing = RoutingStep(pool, router, metrics)
        self.prefill_leg = PrefillLeg(pool, metrics)
        self.decode_leg = DecodeLeg(pool, router, metrics, config.max_migrations, observe=self.routing.observe_plugin,
                                    shared_streams=config.decode_streams == "shared")  # fmt: skip

    async def generate(self, request: gateway_pb2.GenerateRequest, context):
        """The request's chunks, counted in the metrics (outcome, duration, time to first token).

        `context` gives `time_remaining()` (seconds, or None: no deadline) and
        `invocation_metadata()` ((key, value) pairs, keys lower case: gRPC metadata or HTTP
        headers). Raises RequestError (its gRPC code says what went wrong). Closing the generator
        early, or cancelling its task, cancels every downstream call and frees the workers' KV."""
        with self.admission.admit():
            start = time.perf_counter()
            code = "OK"
            try:
                first = True
                # closed explicitly, so that when our consumer closes us early the workers' calls end now
                async with contextlib.aclosing(self._serve(request, context)) as stream:
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
                self.metrics.requests.labels(code).inc()
                self.metrics.request_duration.observe(time.perf_counter() - start)

    async def close(self) -> None:
        await self.prefill_leg.close()

    async def _serve(self, request: gateway_pb2.GenerateRequest, context):
        def remaining():
            return time_left(context)

        validate_request(request, set(self.pool.served_models()), self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        decoders = self._registered_decoders()
        if not self.pool.ready("decode"):
            # registered but still connecting: wait for it (bounded) rather than fail a request
            # that has time; still none ready afterwards: routing raises UNAVAILABLE
            left = remaining()
            await self.pool.wait_until_ready("decode", DECODE_CONNECT_WAIT_S if left is None else min(DECODE_CONNECT_WAIT_S, left))
            decoders = self._registered_decoders()  # the set may have changed meanwhile
        prompt_ids = await self.tokenize.prompt_token_ids(request, remaining)
        worker_request = self._worker_request(request, request_id, prompt_ids, decoders)
        route = self.routing.route(request, request_id, prompt_ids, decoders, dict(context.invocation_metadata() or ()))
        with route.decode.in_flight(route.num_backlog_tokens) as counted:
            async with contextlib.aclosing(self._legs(request, worker_request, remaining, route)) as stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        counted.computed()  # the decode worker's prompt tokens leave its backlog
                    yield chunk

    def _registered_decoders(self) -> list:
        """The registered decode workers; RequestError(UNAVAILABLE) when there are none."""
        decoders = self.pool.registered("decode")
        if not decoders:
            raise unavailable(
                f"no decode workers are registered (etcd prefix {workers_prefix(self.config.cluster)}decode/); start one with `tandem serve decode`"
            )
        return decoders

    def _worker_request(self, request, request_id: str, prompt_ids: list[int], decoders) -> worker_pb2.WorkerGenerateRequest:
        """The request as a worker takes it, its max_tokens fitted to the smallest context of the
        decode workers. Raises RequestError(INVALID_ARGUMENT) when the prompt does not fit."""
        max_model_len = min(h.registration.max_model_len for h in decoders)
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.max_tokens = check_prompt_length(len(prompt_ids), request.sampling, max_model_len, self.config.default_max_tokens)
        return worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, cache_salt=request.cache_salt)

    async def _legs(self, request, worker_request: worker_pb2.WorkerGenerateRequest, remaining, route: Route):
        """Prefill elsewhere first when the decision says so, then decode on the chosen worker."""
        reply = None
        if route.decision.disaggregate:
            forced = request.mode == gateway_pb2.SERVING_MODE_DISAGGREGATED
            reply = await self.prefill_leg.prefill(worker_request, remaining, route, forced)
        if reply is None:  # aggregated: the decode worker computes the prompt itself
            async with contextlib.aclosing(self.decode_leg.stream(worker_request, remaining, route.ctx, route.decode)) as stream:
                async for chunk in stream:
                    yield chunk
            return
        try:
            yield reply.first  # the first token reaches the client before decode starts
            if reply.first.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                return
            worker_request.kv_handle.CopyFrom(reply.kv_handle)
            worker_request.first_token_id = reply.first.token_ids[0]
            decoding = self.decode_leg.stream(
                worker_request, remaining, route.ctx, route.decode, cached_prompt_tokens=reply.num_cached_tokens, streamed_token_ids=reply.first.token_ids
            )
            async with contextlib.aclosing(decoding) as stream:
                async for chunk in stream:
                    yield chunk
        finally:
            # normally the decode worker's pull has released the blocks already; when the request
            # ended before that (cancelled at its first token, failed, recomputed) this frees them
            # now, not at expiry. A first token that ended the request pinned nothing.
            if reply.HasField("kv_handle"):
                self.prefill_leg.release_later(route.decision.prefill, reply.kv_handle)
