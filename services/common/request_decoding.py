"""Undecodable request bytes are INVALID_ARGUMENT, for every method of every service.

grpc.aio calls a method's request_deserializer before any handler runs; when it raises (bytes
that are not the method's protobuf message, a string field that is not UTF-8), the client gets
UNKNOWN or INTERNAL and no message. RequestDecodingInterceptor wraps each method's deserializer so
a failure becomes an Undecodable value instead, and the handler's behavior so that value aborts
the call with INVALID_ARGUMENT naming the expected message ("... is not a valid
tandem.v1.GenerateRequest message"). Streaming requests are checked message by message.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc

from .errors import wrap_behavior


@dataclass(frozen=True)
class Undecodable:
    """A request message that could not be decoded: what it should have been."""

    type_name: str  # the protobuf message's full name, e.g. tandem.v1.GenerateRequest

    @property
    def message(self) -> str:
        return f"the request body is not a valid {self.type_name} message (malformed or not UTF-8 protobuf bytes)"


def _type_name(deserializer) -> str:
    cls = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "request"


def _safe(deserializer):
    type_name = _type_name(deserializer)

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError and whatever else bad bytes raise
            return Undecodable(type_name)

    return decode


async def _checked_iterator(requests, context):
    async for request in requests:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _check_unary_request(behavior):
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behavior(request, context):
                yield response

        return checked_stream

    async def checked(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return checked


def _check_request_stream(behavior):
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(requests, context):
            async for response in behavior(_checked_iterator(requests, context), context):
                yield response

        return checked_stream

    async def checked(requests, context):
        return await behavior(_checked_iterator(requests, context), context)

    return checked


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """See the module's doc. Handlers without a deserializer (raw bytes) are left as they are."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        behavior = (handler.stream_unary or handler.stream_stream) if handler.request_streaming else (handler.unary_unary or handler.unary_stream)
        if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
            return handler
        wrap = _check_request_stream if handler.request_streaming else _check_unary_request
        return wrap_behavior(handler, wrap)._replace(request_deserializer=_safe(handler.request_deserializer))
