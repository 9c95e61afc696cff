"""How request errors become gRPC statuses, once for every service.

A handler raises RequestError (its code says what went wrong, its message what to fix) or aborts
the call itself. ErrorStatusInterceptor, installed on every server by services/common/server.py,
turns a RequestError that escapes a handler into its status, and any other exception into
INTERNAL with a generic message and an id to find the traceback in the log: a client never sees
an internal exception's class, repr or traceback (grpc would send "Unexpected <class ...>" as
UNKNOWN). Every message is bounded (MAX_MESSAGE_CHARS): status details travel in HTTP/2 trailers,
and a client that gets trailers beyond its metadata limit (~8 KiB) sees RESOURCE_EXHAUSTED instead
of the real status.
"""

from __future__ import annotations

import inspect
import logging
import uuid

import grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1024


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to at most `limit` characters, saying so."""
    message = str(message)
    if len(message) <= limit:
        return message
    return message[: limit - 16] + " ... (truncated)"


class RequestError(Exception):
    """An error with its gRPC status code; the message (bounded) says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(bounded(message))
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def internal_error_message(request_id: str) -> str:
    """What a client sees for an unexpected failure: nothing internal, an id to look up in the log."""
    return f"internal error while serving request {request_id}; the server's log has the details under that id"


def request_id_of(request) -> str:
    """The request's own id when it has one (Generate, Prefill), else a fresh one for the log."""
    rid = getattr(request, "request_id", "") if request is not None else ""
    return bounded(rid, 128) if isinstance(rid, str) and rid else "err-" + uuid.uuid4().hex[:12]


async def abort_for(context, e: BaseException, method: str, request) -> None:
    """Abort the call with the status `e` stands for (raises grpc.aio.AbortError)."""
    if isinstance(e, RequestError):
        await context.abort(e.code, bounded(str(e)))
    rid = request_id_of(request)
    log.error("%s failed for request %s", method, rid, exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, internal_error_message(rid))


class _BoundedContext:
    """The handler's ServicerContext, with the messages it aborts with (or sets) bounded too."""

    def __init__(self, context):
        self._context = context

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def abort(self, code, details: str = "", trailing_metadata=()):
        await self._context.abort(code, bounded(details), trailing_metadata)

    def set_details(self, details: str) -> None:
        self._context.set_details(bounded(details))


def _guard_unary_response(behavior, method: str):
    async def guarded(request_or_iterator, context):
        try:
            return await behavior(request_or_iterator, _BoundedContext(context))
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - becomes a status, logged with the request id
            await abort_for(context, e, method, request_or_iterator)

    return guarded


def _guard_stream_response(behavior, method: str):
    async def guarded(request_or_iterator, context):
        try:
            async for response in behavior(request_or_iterator, _BoundedContext(context)):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - becomes a status, logged with the request id
            await abort_for(context, e, method, request_or_iterator)

    return guarded


_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def wrap_behavior(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced by wrap(behavior) (same kind, same (de)serializers)."""
    factory, attr = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(wrap(getattr(handler, attr)), request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    """Every handler's escaped exception becomes a status (see the module's doc)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        attr = _FACTORIES[(handler.request_streaming, handler.response_streaming)][1]
        behavior = getattr(handler, attr)
        if inspect.isasyncgenfunction(behavior):
            return wrap_behavior(handler, lambda b: _guard_stream_response(b, method))
        if inspect.iscoroutinefunction(behavior):
            return wrap_behavior(handler, lambda b: _guard_unary_response(b, method))
        return handler  # a synchronous handler (none here): grpc runs it in its thread pool as it is
