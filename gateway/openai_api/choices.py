"""Run an HTTP request's prompts through the gateway's one request path, one choice each.

    Choices(generate, requests, context)
        ├─ pump 0: async for chunk in generate(requests[0], context) ─┐
        ├─ pump 1: ...                                                ├─► one bounded queue ─► (index, chunk)
        └─ ...                                                        ┘
    started(): every choice's first chunk (or its error), so that a bad prompt is an HTTP error
               status before any byte of a stream is sent
    leaving the `async with`: every pump still running is cancelled, which cancels its gRPC
               calls, so the workers abort the request and free its KV blocks

`generate` is GatewayService.generate; `HttpCallContext` gives it what a grpc.aio context would:
the headers as invocation metadata (so `x-session-id` keeps a conversation on its worker, as on
gRPC) and no deadline (the OpenAI API has none; a client that gives up disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from protos.tandem.v1 import common_pb2, gateway_pb2
from services.common.errors import RequestError

log = logging.getLogger(__name__)

_END = object()  # a pump's last event
QUEUE_SIZE = 64  # chunks buffered ahead of a slow client before the pumps wait


class HttpCallContext:
    """What the request path reads of a call context, for an HTTP request."""

    def __init__(self, headers):
        self._metadata = tuple((k.lower(), v) for k, v in headers.items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None


class Choices:
    """The streams of one request's prompts, merged in arrival order (see the module's doc)."""

    def __init__(self, generate: Callable[..., AsyncIterator[common_pb2.GenerateResponse]], requests: list[gateway_pb2.GenerateRequest], context):
        self._generate, self._requests, self._context = generate, requests, context
        self._queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self._tasks: list[asyncio.Task] = []
        self._seen: list[tuple[int, object]] = []  # events taken off the queue by started()
        self._running = len(requests)

    async def __aenter__(self) -> "Choices":
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self._requests)]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pump(self, index: int, request: gateway_pb2.GenerateRequest) -> None:
        try:
            async with contextlib.aclosing(self._generate(request, self._context)) as stream:
                async for chunk in stream:
                    await self._queue.put((index, chunk))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - RequestError, or a bug: either is the handler's to report
            if not isinstance(e, RequestError):
                log.exception("choice %d of a request failed", index)
            await self._queue.put((index, e))
            return
        await self._queue.put((index, _END))

    async def started(self) -> None:
        """Wait for every choice's first event; raise the first error among them."""
        waiting = set(range(len(self._requests)))
        while waiting:
            index, event = await self._queue.get()
            self._seen.append((index, event))
            if isinstance(event, Exception):
                raise event
            waiting.discard(index)

    async def __aiter__(self) -> AsyncIterator[tuple[int, common_pb2.GenerateResponse]]:
        """(choice index, chunk) until every choice has ended; a choice's error is raised."""
        while self._running:
            index, event = self._seen.pop(0) if self._seen else await self._queue.get()
            if event is _END:
                self._running -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield index, event
