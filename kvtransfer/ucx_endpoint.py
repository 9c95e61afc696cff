"""TaggedEndpoint: an error-handling UCX endpoint whose tagged sends and receives are bare requests.

ucxx's asyncio Endpoint wraps every send and receive in a coroutine, which the transport then had
to wrap in a Task to keep many in flight: per message a Task, its coroutine's frames and two
extra wake-ups on the loop, on top of ucxx's own completion path (its notifier thread sets the
request's future on the loop). A pull is one message per run of blocks, so with scattered blocks
(one 720 KiB block a message for the default model) that Python competed with the copy itself: on
a 2-core host a 256-block pull used 75 ms of CPU in the client and 38 ms in the server for 62 ms
of wall time, against ~30 ms for the bytes (docs/benchmarks.md, 12-07). Here a send or receive is posted straight on
ucxx's low-level endpoint and returns the request's own asyncio future (set by the notifier, with
the UCX error as its exception); callers chain work on it with done-callbacks or await it.

Every call runs on the UCX loop (UcxRuntime), as the futures belong to it. The endpoint keeps each
request object alive until its future is done: ucxx cancels a request whose object is freed.

Each request takes its future from the worker's pool of 100, which ucxx's notifier thread tops up
only when it wakes. A few pulls at once (each with 32 receives in flight) emptied it, and ucxx then
printed "UCXX WARN No Futures available during getFuture()" on stdout for every request that found
it empty, dozens of lines a second; so every post first tops the pool up itself (only a size check
while it is at least half full).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .ucx_runtime import UcxRuntime, ucx_address


class TaggedEndpoint:
    """One error-handling endpoint to a peer's UCX worker, for tagged messages with exact tags."""

    def __init__(self, rt: UcxRuntime, worker_address: bytes):
        import ucxx._lib.libucxx as ucx_api

        self._worker: Any = rt.ctx.worker
        self._ep: Any = ucx_api.UCXEndpoint.create_from_worker_address(self._worker, ucx_address(worker_address), True)
        self._live: dict[asyncio.Future, tuple[Any, Any]] = {}  # future -> (its request, its buffer) until done

    def send(self, buffer: np.ndarray | bytes, tag: int) -> asyncio.Future:
        """Post a tagged send of `buffer` (kept alive until the send is done)."""
        from ucxx._lib.arr import Array
        from ucxx.types import Tag

        arr = Array(buffer)
        return self._track(self._posting().tag_send(arr, Tag(tag)), arr)

    def recv(self, buffer: np.ndarray, tag: int) -> asyncio.Future:
        """Post a receive of the message with exactly this tag from this peer into `buffer`."""
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        arr = Array(buffer)
        return self._track(self._posting().tag_recv(arr, Tag(tag), TagMaskFull), arr)

    def abort(self) -> None:
        """Close at once without telling the peer: UCX cancels every request still running (their
        futures end with UCXCanceledError, after a read in progress has finished). Idempotent."""
        ep, self._ep = self._ep, None
        if ep is not None:
            with contextlib.suppress(Exception):
                ep.close_blocking(period=10**9, max_attempts=1)
                ep.remove_close_callback()

    def abort_soon(self) -> None:
        """Abort right after the current step on the UCX loop: keeps the close off the latency of
        whoever ends with this endpoint. The buffers of requests the abort cancels stay alive with
        their requests (in _live) until their futures are done."""
        asyncio.get_running_loop().call_soon(self.abort)

    @property
    def closed(self) -> bool:
        return self._ep is None

    def _posting(self) -> Any:
        if self._ep is None:
            raise ConnectionError("the UCX endpoint is closed")
        self._ep.raise_on_error()  # a peer that failed: raise now rather than post a request that never runs
        self._worker.populate_python_futures_pool()  # the request takes one (see the module's doc)
        return self._ep

    def _track(self, request: Any, buffer: Any) -> asyncio.Future:
        fut = request.future
        self._live[fut] = (request, buffer)
        fut.add_done_callback(self._settled)
        return fut

    def _settled(self, fut: asyncio.Future) -> None:
        del self._live[fut]
        if not fut.cancelled():
            fut.exception()  # marked retrieved: the requests an abort cancels are expected to fail


async def completed(fut: asyncio.Future, timeout: float | None = None) -> Any:
    """The request's result once it is done (its UCX error raised), TimeoutError after `timeout`.

    Never cancels `fut`, also when the caller is cancelled: a request ends only by completing or
    by its endpoint's abort, so that nothing reads or writes its buffer once its future is done."""
    if not fut.done():
        done, _ = await asyncio.wait((fut,), timeout=timeout)
        if not done:
            raise TimeoutError
    return fut.result()


class Pipeline:
    """`count` requests, `post(k)` for k = 0..count-1 in order, at most `window` of them posted at a
    time: each next one is posted from the completion callback of an earlier one, so keeping the
    window full costs one callback a request and no coroutine.

    `finished` is done once every request has completed, or fails with the first error (a request's
    UCX error, or whatever `post` raised); after that nothing more is posted. `in_flight` holds the
    requests posted and not yet done (what an abort must wait out)."""

    def __init__(self, count: int, window: int, post: Callable[[int], asyncio.Future]):
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()
        self.in_flight: dict[int, asyncio.Future] = {}
        self.completed = 0
        self._count, self._post, self._posted = count, post, 0
        if count == 0:
            self.finished.set_result(None)
        try:
            while self._posted < min(window, count):
                self._post_next()
        except Exception as e:  # noqa: BLE001 - reported through `finished`
            self.finished.set_exception(e)

    def stop(self) -> None:
        """Post nothing more (the requests in flight go on until they complete or are aborted)."""
        if not self.finished.done():
            self.finished.cancel()
        elif not self.finished.cancelled():
            self.finished.exception()  # retrieved: whoever stops a failed pipeline reports the failure

    def _post_next(self) -> None:
        k = self._posted
        fut = self._post(k)
        self._posted += 1
        self.in_flight[k] = fut
        fut.add_done_callback(functools.partial(self._on_done, k))

    def _on_done(self, k: int, fut: asyncio.Future) -> None:
        del self.in_flight[k]
        if self.finished.done():
            return
        error = ConnectionError("a UCX request was cancelled") if fut.cancelled() else fut.exception()
        if error is None:
            self.completed += 1
            try:
                if self._posted < self._count:
                    self._post_next()
            except Exception as e:  # noqa: BLE001 - reported through `finished`
                error = e
        if error is not None:
            self.finished.set_exception(error)
        elif self.completed == self._count:
            self.finished.set_result(None)
