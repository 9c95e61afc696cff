"""The decode leg of a request: stream it from a decode worker, and survive that worker failing.

    before the worker's first chunk   a failure that another worker may not repeat (RETRYABLE_CODES)
                                      → the same request on another worker (routing policy)
    after chunks were streamed        → migration: the request continues on another worker as a
                                      continuation (continuation_request), at most max_migrations
                                      times; then, or when no other worker is left, UNAVAILABLE

A continuation carries the prompt and, as resume_token_ids, every token the client already has:
the new worker computes prompt + those tokens (its prefix cache may hold them), counts them against
max_tokens and in the usage, replays them through its stop-string and text state without streaming
them again, and a seeded request's generator skips the draws they took. The client's stream goes
on with no token missing or repeated, and a greedy request ends exactly as an uninterrupted one.
Failures of either kind are reported to the outlier detector, successes too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc

from protos.tandem.v1 import worker_pb2
from services.common.errors import RequestError, unavailable
from services.common.telemetry import tracer

from .outlier_detection import WORKER_FAILURE_CODES
from .scheduling.base import RequestContext

log = logging.getLogger(__name__)

# A worker's failure, not the request's: another worker may well serve it. Never INVALID_ARGUMENT,
# OUT_OF_RANGE, FAILED_PRECONDITION (the request is wrong; every worker says so), RESOURCE_EXHAUSTED
# (the request is too big for the workers, or they are all full: retrying adds load) or
# DEADLINE_EXCEEDED (the client's time is up). CANCELLED from a worker means it gave up the call
# (a drain that ran out of time); our own cancellations arrive as CancelledError instead.
RETRYABLE_CODES = WORKER_FAILURE_CODES | {grpc.StatusCode.CANCELLED}


def continuation_request(original: worker_pb2.WorkerGenerateRequest, streamed_token_ids: Sequence[int]) -> worker_pb2.WorkerGenerateRequest:
    """The request that resumes `original` on another decode worker after the client received
    `streamed_token_ids` (a disaggregated request's first token included). The same prompt,
    sampling (max_tokens counts the resumed tokens: the worker subtracts them), cache salt and
    request id; no KV handle (its blocks went to the dead worker). Does not mutate `original`."""
    return worker_pb2.WorkerGenerateRequest(
        request_id=original.request_id,
        prompt_token_ids=original.prompt_token_ids,
        sampling=original.sampling,
        cache_salt=original.cache_salt,
        resume_token_ids=[*original.resume_token_ids, *streamed_token_ids],
    )


class DecodeLeg:
    """Streams requests from decode workers with retries and migration (see the module docstring).
    `observe(plugin, seconds)` times the routing plugins."""

    def __init__(self, pool, router, metrics, max_migrations: int, observe: Callable | None = None, shared_streams: bool = False):
        """`shared_streams`: send requests over each worker's one GenerateMany stream (setting
        decode_streams = shared; gateway/decode_mux.py) instead of a Generate call each."""
        self.pool, self.router, self.metrics = pool, router, metrics
        self.max_migrations = max_migrations
        self.shared_streams = shared_streams
        self._observe = observe

    async def stream(self, worker_request: worker_pb2.WorkerGenerateRequest, remaining: Callable[[], float | None], route: RequestContext,
                     first_choice, cached_prompt_tokens: int | None = None, streamed_token_ids: Sequence[int] = ()):  # fmt: skip
        """The request's chunks, from `first_choice` and, when workers fail, from others.

        `remaining()`: the client's time left (raises RequestError when it is up).
        `cached_prompt_tokens`: the prefill worker's count, which the usage reports for a
        disaggregated request. `streamed_token_ids`: tokens the client already has from another
        leg (the prefill worker's first token). Raises RequestError."""
        tried: set[str] = set()
        streamed = list(streamed_token_ids)
        decoded = False  # a decode worker streamed something: moving on is a migration
        migrations = 0
        request, handle, last_error = worker_request, first_choice, None
        while True:
            if handle is None or handle.key in tried:
                handle = self._pick(route, tried)
            if handle is None:
                detail = f"; last error: {last_error.details()}" if last_error is not None else ""
                raise unavailable(f"no decode worker is reachable ({len(self.pool.registered('decode'))} registered, {len(tried)} tried){detail}")
            self.metrics.decisions.labels(handle.worker_id, self.router.policy).inc()
            # the first choice is counted by the request path, from the decision on; the others here
            with handle.in_flight() if handle is not first_choice else contextlib.nullcontext():
                if self.shared_streams:
                    call = handle.open_decode(request, remaining())
                else:
                    call = handle.decode_stub().Generate(request, timeout=remaining())
                try:
                    async for chunk in call:
                        decoded = True
                        if chunk.HasField("usage") and chunk.usage.prompt_tokens:
                            self._fix_usage(chunk.usage, cached_prompt_tokens, migrated=migrations > 0)
                        streamed.extend(chunk.token_ids)
                        yield chunk
                    self.pool.record_outcome(handle, grpc.StatusCode.OK)
                    return
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    self.pool.record_outcome(handle, code)
                    if code not in RETRYABLE_CODES:
                        raise RequestError(code, e.details() or code.name) from None
                    if code == grpc.StatusCode.UNAVAILABLE:
                        handle.mark_unreachable()  # until its Watch stream answers again
                    tried.add(handle.key)
                    last_error = e
                    if decoded:
                        if migrations >= self.max_migrations:
                            raise unavailable(f"decode worker {handle.worker_id} failed mid-stream ({code.name}) and the request has used its "
                                              f"{self.max_migrations} migrations (max_migrations); retry the request") from None  # fmt: skip
                        migrations += 1
                        request = continuation_request(worker_request, streamed)
                        self.metrics.worker_retries.labels("decode", "migration").inc()
                        log.warning("decode worker %s failed mid-stream (%s) after %d tokens of %s; migrating it (%d of %d)",
                                    handle.worker_id, code.name, len(streamed), request.request_id, migrations, self.max_migrations)  # fmt: skip
                    else:
                        self.metrics.worker_retries.labels("decode", "before-first-token").inc()
                        log.warning("decode worker %s failed (%s: %s) before streaming; trying another", handle.worker_id, code.name, e.details())
                finally:
                    call.cancel()  # no-op when it finished; otherwise the worker aborts and frees the KV

    def _pick(self, route: RequestContext, tried: set[str]):
        with tracer().start_as_current_span("gateway.route") as span:
            candidates = [h for h in self.pool.workers.values() if h.key not in tried]
            handle = self.router.pick(route, candidates, observe=self._observe)
            span.set_attribute("tandem.candidates", len(candidates))
            if handle is not None:
                span.set_attribute("tandem.worker_id", handle.worker_id)
        return handle

    def _fix_usage(self, usage, cached_prompt_tokens: int | None, migrated: bool) -> None:
        """The final chunk's usage as the client must see it. Mutates `usage`."""
        if cached_prompt_tokens is not None:
            usage.cached_prompt_tokens = cached_prompt_tokens  # the tokens no worker computed for this request
        elif migrated:
            # the last worker's cache hits cover prompt + resumed tokens; only the prompt's count
            usage.cached_prompt_tokens = min(usage.cached_prompt_tokens, usage.prompt_tokens)
        self.metrics.prefix_hit_ratio.observe(usage.cached_prompt_tokens / usage.prompt_tokens)
