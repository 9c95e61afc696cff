"""What a worker does when its engine thread dies: answer UNAVAILABLE everywhere, then leave.

    engine thread dies ──on_death──► EngineFailure.set(error)
        │  every open stream / pending CheckIntegrity gets EngineDeadError → UNAVAILABLE (guard)
        │  every new RPC but grpc.health and reflection → UNAVAILABLE at once (guard)
        └► the bootstrap (server.py) wakes from wait(): health NOT_SERVING → revoke the etcd lease
           (the gateway stops routing here) → a short drain → exit code 1, so a supervisor
           (tandem up, Kubernetes, compose's restart policy) starts a fresh process

UNAVAILABLE, never UNKNOWN: it tells the gateway (and any client) that another worker can serve
the same request. Messages name the worker and what to do, never the internal exception: that is
logged here, once, with its traceback printed by the engine thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import grpc

log = logging.getLogger(__name__)

# RPCs that keep their normal answer after a failure: health says NOT_SERVING by itself
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class EngineFailure:
    """A worker's record of its engine's death: set once (from AsyncEngine.on_death), read by the
    guard, awaited by the bootstrap. Event-loop only."""

    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.error: BaseException | None = None
        # False until the worker has loaded its engine and started its role (mark_ready): a process
        # restarted on the same address gets calls meant for its dead predecessor before then
        self._event = asyncio.Event()
        self.ready = False

    @property
    def failed(self) -> bool:
        return self.error is not None

    def set(self, error: BaseException) -> None:
        """Mutates; later calls are ignored (the first error is the cause)."""
        if self.error is not None:
            return
        self.error = error
        log.error("the engine of %s failed (%r): not serving, leaving the cluster, then exiting", self.worker_id, error)
        self._event.set()

    async def wait(self) -> str:
        """Block until the engine fails; returns what happened, for the log."""
        await self._event.wait()
        return repr(self.error)

    @property
    def message(self) -> str:
        return f"the engine of worker {self.worker_id} failed and the worker is shutting down; retry on another worker"


def is_engine_death(error: BaseException) -> bool:
    from services.engine.async_engine import EngineDeadError  # loaded already in a worker process

    return isinstance(error, EngineDeadError)


class EngineFailureGuard(grpc.aio.ServerInterceptor):
    """Maps an engine failure to UNAVAILABLE on every RPC of a worker (see the module docstring)."""

    def __init__(self, failure: EngineFailure):
        self.failure = failure

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._guard_unary(handler.unary_unary))
        if handler.unary_stream is not None:
            if not inspect.isasyncgenfunction(handler.unary_stream):
                return handler  # a coroutine that writes with context.write(): none of ours
            return handler._replace(unary_stream=self._guard_stream(handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._guard_unary(handler.stream_unary))
        if not inspect.isasyncgenfunction(handler.stream_stream):
            return handler
        return handler._replace(stream_stream=self._guard_stream(handler.stream_stream))

    async def _abort_if_failed(self, error: BaseException | None, context) -> None:
        """Abort with UNAVAILABLE when the engine has failed (or `error` says it just did); an
        abort the handler chose itself (INVALID_ARGUMENT...) stands."""
        if isinstance(error, grpc.aio.AbortError):
            return
        if not self.failure.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.failure.worker_id} is still starting (loading its model); retry on another worker")
        if self.failure.failed or (error is not None and is_engine_death(error)):
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.failure.message)

    def _guard_unary(self, behavior):
        async def guarded(request, context):
            await self._abort_if_failed(None, context)
            try:
                return await behavior(request, context)
            except Exception as e:  # noqa: BLE001 - re-raised unless it is the engine's death
                await self._abort_if_failed(e, context)
                raise

        return guarded

    def _guard_stream(self, behavior):
        async def guarded(request, context):
            await self._abort_if_failed(None, context)
            try:
                async for response in behavior(request, context):
                    yield response
            except Exception as e:  # noqa: BLE001 - re-raised unless it is the engine's death
                await self._abort_if_failed(e, context)
                raise

        return guarded
