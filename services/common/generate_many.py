"""Decode.GenerateMany on a decode worker (real or simulated): many generations over one stream, one
message per engine step.

    gateway ──DecodeControl(start | cancel)──► reader ──► one task per request, each running
                                                          DecodeService.Generate as its own call would
    gateway ◄──DecodeBatch(items)── writer ◄── outbox ◄── every chunk and final status, as DecodeItems

Why: with Generate, every token of every request is one gRPC message, and on a small machine the
per-message work (HTTP/2 frames, the poller thread, a task wake-up on both ends) competes with the
engine's threads for the same cores: a 64-request burst cost the decode worker ~1.1 CPU-s of
serving work and the gateway ~0.5 CPU-s of receiving, for 8,192 tokens (docs/benchmarks.md). The
engine hands a step's outputs to the event loop in one call (AsyncEngine._publish), so every
request's task runs in one loop iteration and the writer, woken after them, sends all their
chunks as one DecodeBatch.

Each request keeps Generate's exact behaviour: the same handler runs it (validation, KV pull,
resume), with a context whose abort() ends only that request; its final DecodeItem carries the
status Generate would have ended with. A cancel (the gateway's client left, or its deadline
passed) aborts the request in the engine and frees its KV, as a cancelled call does. When the
stream itself ends (the gateway went away), every request on it is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from protos.tandem.v1 import worker_pb2
from services.common.errors import abort_for, bounded
from services.common.telemetry import tracer

log = logging.getLogger(__name__)

# Each request gets the spans its own Generate call would have had: a client span at the gateway
# (gateway/decode_mux.py) and a server span here, under it, so traces read the same whichever
# way the request travelled.
LOGICAL_CALL = "/tandem.v1.Decode/Generate"
STREAM_SPAN_ATTRIBUTES = {"rpc.system": "grpc", "tandem.decode_stream": "GenerateMany"}


class RequestAborted(Exception):
    """A request of the stream ended with a status (what context.abort() does to a call)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class RequestContext:
    """What DecodeService.Generate uses of its ServicerContext, for one request of the stream."""

    def __init__(self, timeout_seconds: float):
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout_seconds if timeout_seconds > 0 else None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        raise RequestAborted(code, bounded(details))

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - asyncio.get_running_loop().time())


class Outbox:
    """The items waiting for the writer: put() from request tasks, take() all at once."""

    def __init__(self):
        self._items: list[worker_pb2.DecodeItem] = []
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, item: worker_pb2.DecodeItem) -> None:
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def take(self) -> list[worker_pb2.DecodeItem] | None:
        """Everything queued, once there is something; None when closed and drained."""
        while not self._items and not self._closed:
            self._ready.clear()
            await self._ready.wait()
        items, self._items = self._items, []
        return items or None


class NeverFails:
    """The failure record of a worker whose engine cannot die (the simulated one)."""

    failed, message = False, ""


NEVER_FAILS = NeverFails()


class GenerateManyStream:
    """One GenerateMany call. `generate(request, context)` is the worker's Generate handler;
    `failure` its engine's failure record (services/worker/engine_failure.EngineFailure: failed,
    message; a worker still starting never gets here, its EngineFailureGuard refuses the stream) and `is_engine_death(exc)` says whether an exception means the engine died
    (the request then ends UNAVAILABLE, to be retried elsewhere). Injected, so this module stays
    free of the engine (the simulated workers serve it too)."""

    def __init__(self, generate: Callable[..., AsyncIterator], failure=NEVER_FAILS, is_engine_death: Callable[[BaseException], bool] = lambda e: False):
        self._generate = generate
        self._failure = failure
        self._is_engine_death = is_engine_death
        self._outbox = Outbox()
        self._tasks: dict[int, asyncio.Task] = {}

    async def serve(self, controls: AsyncIterator[worker_pb2.DecodeControl]) -> AsyncIterator[worker_pb2.DecodeBatch]:
        reader = asyncio.create_task(self._read(controls), name="GenerateMany reader")
        try:
            while (items := await self._outbox.take()) is not None:
                yield worker_pb2.DecodeBatch(items=items)
            await reader  # raises what reading the controls raised (a bad message: INVALID_ARGUMENT)
        finally:
            reader.cancel()
            tasks = [reader, *self._tasks.values()]
            for task in tasks:
                task.cancel()  # the gateway is gone: abort every request, freeing its KV
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, controls) -> None:
        try:
            async for control in controls:
                if control.WhichOneof("action") == "start":
                    self._start(control)
                elif control.cancel:
                    task = self._tasks.get(control.stream_id)
                    if task is not None:
                        task.cancel()
            # the gateway has sent its last control: finish what runs, then end the call
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        finally:
            self._outbox.close()

    def _start(self, control: worker_pb2.DecodeControl) -> None:
        sid = control.stream_id
        if sid in self._tasks:
            self._finish(sid, grpc.StatusCode.INVALID_ARGUMENT, f"stream_id {sid} is already running on this stream")
            return
        task = asyncio.create_task(self._run(control), name=f"GenerateMany {sid}")
        self._tasks[sid] = task
        task.add_done_callback(lambda _t: self._tasks.pop(sid, None))

    async def _run(self, control: worker_pb2.DecodeControl) -> None:
        sid, request = control.stream_id, control.start
        # the span this request's own Generate call would have had, under the gateway's client span
        parent = propagate.extract(dict(control.trace_context))
        span = tracer().start_span(LOGICAL_CALL, context=parent, kind=trace.SpanKind.SERVER, attributes=STREAM_SPAN_ATTRIBUTES)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        context = RequestContext(control.timeout_seconds)
        try:
            if self._failure.failed:
                raise RequestAborted(grpc.StatusCode.UNAVAILABLE, self._failure.message)
            async with asyncio.timeout(context.time_remaining()):
                async for chunk in self._generate(request, context):
                    self._outbox.put(worker_pb2.DecodeItem(stream_id=sid, chunk=chunk))
            self._finish(sid, grpc.StatusCode.OK, "")
        except asyncio.CancelledError:
            raise  # cancelled by the gateway (or the stream ended): nobody waits for a status
        except RequestAborted as e:
            self._finish(sid, e.code, e.message)
        except TimeoutError:
            self._finish(sid, grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired on the decode worker")
        except Exception as e:  # noqa: BLE001 - becomes this request's status; the stream goes on
            if self._is_engine_death(e):
                self._finish(sid, grpc.StatusCode.UNAVAILABLE, self._failure.message)
                return
            try:  # what ErrorStatusInterceptor makes of it for a Generate call: its code, or INTERNAL (logged)
                await abort_for(context, e, LOGICAL_CALL, request)
            except RequestAborted as aborted:
                self._finish(sid, aborted.code, aborted.message)
        finally:
            otel_context.detach(token)
            span.end()

    def _finish(self, sid: int, code: grpc.StatusCode, message: str) -> None:
        if code != grpc.StatusCode.OK:
            trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {message}"))
        self._outbox.put(worker_pb2.DecodeItem(stream_id=sid, done=True, status_code=code.value[0], status_message=bounded(message)))
