"""The gateway's end of Decode.GenerateMany: every request to one decode worker over one stream.

    DecodeLeg ── handle.open_decode(request, timeout) ──► MuxCall ──start──► DecodeMux ══ one
              ◄── chunks (AioRpcError on failure) ─────  MuxCall ◄─queue──  reader      GenerateMany
                                                                                        call

A MuxCall is used exactly as the Generate call it replaces (iterate its chunks, cancel() when
done, grpc.aio.AioRpcError with the worker's status on failure), so the decode leg's retries and
migration do not change. The worker answers with one DecodeBatch per engine step for all the
gateway's requests there, instead of a message per request per token (why: services/common/generate_many.py).

- The stream opens with the first request and stays open; it has no deadline of its own. Each
  request's deadline travels in its start (the worker enforces it too) and is kept here by a
  timer that ends the request with DEADLINE_EXCEEDED, as a call's deadline would.
- The stream failing (worker gone, keepalive timeout, drain) fails every request on it with the
  stream's status; the next request opens a new stream.
- A worker without GenerateMany (an older version: UNIMPLEMENTED) gets Generate calls from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from protos.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.generate_many import LOGICAL_CALL, STREAM_SPAN_ATTRIBUTES
from services.common.telemetry import tracer

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_DEADLINE = object()  # put in a request's queue when its deadline passes


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class _Session:
    """One GenerateMany call and the requests running on it."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        # opened outside the first request's trace: the stream outlives it and serves many others
        # (each request has its own span, see LOGICAL_CALL); its call span is a root of its own
        token = otel_context.attach(otel_context.Context())
        try:
            self.call = worker_pb2_grpc.DecodeStub(channel).GenerateMany()
            self.reader = asyncio.create_task(self._read(), name="GenerateMany reader")
        finally:
            otel_context.detach(token)
        self.queues: dict[int, asyncio.Queue] = {}
        self.error: grpc.aio.AioRpcError | None = None  # set once the call has ended
        self.write_lock = asyncio.Lock()  # grpc.aio allows one write at a time

    async def _read(self) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the decode worker ended the GenerateMany stream")
        try:
            async for batch in self.call:
                for item in batch.items:
                    queue = self.queues.get(item.stream_id)
                    if queue is not None:  # None: a request the gateway already gave up
                        queue.put_nowait(item)
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, "the gateway closed the GenerateMany stream")
            raise
        finally:
            self.error = error
            for queue in self.queues.values():
                queue.put_nowait(error)

    async def write(self, control: worker_pb2.DecodeControl) -> None:
        if self.error is not None:
            raise self.error
        async with self.write_lock:
            try:
                await self.call.write(control)
            except (grpc.aio.UsageError, asyncio.InvalidStateError):  # the call ended meanwhile
                raise self.error or rpc_error(grpc.StatusCode.UNAVAILABLE, "the GenerateMany stream closed") from None

    def close(self) -> None:
        self.call.cancel()


class DecodeMux:
    """The GenerateMany stream(s) of one decode worker handle, on the handle's current channel."""

    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.unsupported = False  # the worker answered UNIMPLEMENTED: use Generate calls
        self._session: _Session | None = None
        self._ids = itertools.count(1)

    def session(self, channel: grpc.aio.Channel) -> _Session:
        """The open stream on `channel`, opened now if there is none (or the last one failed, or
        the channel was replaced: the old stream ends with its last request)."""
        old = self._session
        if old is None or old.error is not None or old.channel is not channel:
            self._session = _Session(channel)
            if old is not None:
                self.release(old)  # a replaced stream with no request left closes now
        return self._session

    def next_stream_id(self) -> int:
        return next(self._ids)

    def release(self, session: _Session) -> None:
        """A request on `session` ended: a stream that was replaced closes with its last request."""
        if session is not self._session and not session.queues and session.error is None:
            session.close()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


class MuxCall:
    """One request over a DecodeMux, behaving as `DecodeStub.Generate(request, timeout=timeout)`."""

    def __init__(self, mux: DecodeMux, channel: grpc.aio.Channel, request: worker_pb2.WorkerGenerateRequest, timeout: float | None):
        self._mux, self._channel, self._request, self._timeout = mux, channel, request, timeout
        self._session: _Session | None = None
        self._stream_id = 0
        self._fallback = None  # the Generate call used when the worker has no GenerateMany
        self._finished = False
        self._timer: asyncio.TimerHandle | None = None  # ends the request at its deadline
        self._span: trace.Span | None = None  # this request's client span, until it ends

    def __aiter__(self):
        return self._chunks()

    def cancel(self) -> bool:
        """Give the request up (no-op once it has ended): the worker aborts it and frees its KV."""
        if self._fallback is not None:
            return self._fallback.cancel()
        if self._finished or self._session is None:
            return False
        self._finished = True
        session, sid = self._session, self._stream_id
        self._end(session, sid)
        if session.error is None:
            task = asyncio.get_running_loop().create_task(_send_quietly(session, worker_pb2.DecodeControl(stream_id=sid, cancel=True)))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        return True

    async def _chunks(self):
        if self._mux.unsupported:
            async for chunk in self._generate_call():
                yield chunk
            return
        loop = asyncio.get_running_loop()
        session = self._session = self._mux.session(self._channel)
        sid = self._stream_id = self._mux.next_stream_id()
        queue: asyncio.Queue = asyncio.Queue()
        session.queues[sid] = queue
        control = worker_pb2.DecodeControl(stream_id=sid, start=self._request, timeout_seconds=self._timeout or 0.0)
        # not made current: this generator runs in its consumer's context between chunks
        # the request's client span (its parent travels in the start: see LOGICAL_CALL)
        span = self._span = tracer().start_span(LOGICAL_CALL, kind=trace.SpanKind.CLIENT, attributes=STREAM_SPAN_ATTRIBUTES)
        propagate.inject(control.trace_context, context=trace.set_span_in_context(span))
        if self._timeout is not None:
            self._timer = loop.call_at(loop.time() + self._timeout, queue.put_nowait, _DEADLINE)
        received = False
        try:
            await session.write(control)
            while True:
                item = await queue.get()
                if item is _DEADLINE:
                    self.cancel()
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                if isinstance(item, grpc.aio.AioRpcError):
                    raise item
                if item.HasField("chunk"):
                    received = True
                    yield item.chunk
                if item.done:
                    self._finished = True
                    code = _STATUS.get(item.status_code, grpc.StatusCode.UNKNOWN)
                    if code != grpc.StatusCode.OK:
                        raise rpc_error(code, item.status_message)
                    return
        except grpc.aio.AioRpcError as e:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{e.code().name}: {e.details()}"))
            if e.code() != grpc.StatusCode.UNIMPLEMENTED or received:
                raise
            log.info("decode worker %s has no GenerateMany (an older version); using a Generate call per request", self._mux.worker_id)
            self._mux.unsupported = True
        finally:
            self._end(session, sid)
        async for chunk in self._generate_call():  # only after UNIMPLEMENTED, before any chunk
            yield chunk

    def _end(self, session: _Session, sid: int) -> None:
        """The request is over (ended, failed or given up): idempotent."""
        if self._span is not None:
            self._span.end()
            self._span = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session.queues.pop(sid, None)
        self._mux.release(session)

    async def _generate_call(self):
        self._fallback = worker_pb2_grpc.DecodeStub(self._channel).Generate(self._request, timeout=self._timeout)
        async for chunk in self._fallback:
            yield chunk


_BACKGROUND: set[asyncio.Task] = set()  # cancel messages in flight (held so they are not collected)


async def _send_quietly(session: _Session, control: worker_pb2.DecodeControl) -> None:
    """A cancel: if the stream has failed meanwhile, the worker has dropped the request already."""
    try:
        await session.write(control)
    except grpc.aio.AioRpcError:
        pass
