"""Every gRPC server's error path (services/common/errors.py, request_decoding.py): undecodable bytes
are INVALID_ARGUMENT, a RequestError is its own status, anything else INTERNAL with a generic
message and a request id (never the exception's class or text), and every message is bounded."""

from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common.errors import MAX_MESSAGE_CHARS, ErrorStatusInterceptor, RequestError, invalid
from services.common.request_decoding import RequestDecodingInterceptor
from services.common.telemetry import server_interceptors


class Unlucky(Exception):
    pass


class Gateway(gateway_pb2_grpc.GatewayServicer):
    """Fails as the request's text asks."""

    async def Generate(self, request, context):
        yield common_pb2.GenerateResponse(request_id=request.request_id, text="first")
        if request.text == "invalid":
            raise invalid("sampling.temperature must be finite")
        if request.text == "huge":
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x" * 100_000)
        if request.text == "bug":
            raise Unlucky("secret internal state <object at 0x1234>")
        if request.text == "service-interceptor":
            raise LookupError("mapped by the service's own interceptor")
        yield common_pb2.GenerateResponse(request_id=request.request_id, text="done")

    async def ListWorkers(self, request, context):
        raise KeyError("a bug in a unary handler")


class Tokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    async def DetokenizeStream(self, request_iterator, context):
        async for request in request_iterator:
            yield tokenizer_pb2.DetokenizeStreamResponse(text=str(len(request.token_ids)))


class ServiceOwnInterceptor(grpc.aio.ServerInterceptor):
    """Like a worker's engine-failure guard: maps one exception to UNAVAILABLE, re-raises others."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_stream is None:
            return handler
        behavior = handler.unary_stream

        async def guarded(request, context):
            try:
                async for r in behavior(request, context):
                    yield r
            except LookupError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is gone")

        return handler._replace(unary_stream=guarded)


@pytest.fixture
async def server():
    # the bootstrap's order (services/common/server.py)
    interceptors = [*server_interceptors(), ErrorStatusInterceptor(), RequestDecodingInterceptor(), ServiceOwnInterceptor()]
    srv = grpc.aio.server(interceptors=interceptors)
    gateway_pb2_grpc.add_GatewayServicer_to_server(Gateway(), srv)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(Tokenizer(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(None)


async def _generate(channel, text: str, request_id: str = "rid-7"):
    stub = gateway_pb2_grpc.GatewayStub(channel)
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in stub.Generate(gateway_pb2.GenerateRequest(text=text, request_id=request_id), timeout=10):
            chunks.append(chunk)
    return chunks, err.value


async def test_garbage_bytes_are_invalid_argument_naming_the_message(server):
    async with grpc.aio.insecure_channel(server) as channel:
        raw = channel.unary_stream("/tandem.v1.Gateway/Generate", request_serializer=None, response_deserializer=None)
        for garbage in (b"\xff\xff\xff\xff", b"\x12\x03\xc3\x28\xff", b"\x0a\xff\xff\xff\xff\x0f"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in raw(garbage, timeout=10):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "tandem.v1.GenerateRequest" in err.value.details()


async def test_a_garbage_message_in_a_request_stream_is_invalid_argument(server):
    async with grpc.aio.insecure_channel(server) as channel:
        raw = channel.stream_stream("/tandem.v1.Tokenizer/DetokenizeStream", request_serializer=None, response_deserializer=None)
        good = tokenizer_pb2.DetokenizeStreamRequest(token_ids=[1, 2]).SerializeToString()
        call = raw(iter([good, b"\xff\xff\xff"]), timeout=10)
        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for reply in call:
                replies.append(reply)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tandem.v1.DetokenizeStreamRequest" in err.value.details()
        assert len(replies) == 1  # the good message was served first


async def test_request_error_mid_stream_keeps_its_code(server):
    async with grpc.aio.insecure_channel(server) as channel:
        chunks, err = await _generate(channel, "invalid")
    assert [c.text for c in chunks] == ["first"]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.temperature" in err.details()


async def test_a_huge_message_is_bounded_and_the_status_survives(server):
    async with grpc.aio.insecure_channel(server) as channel:
        _, err = await _generate(channel, "huge")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(err.details()) <= MAX_MESSAGE_CHARS and err.details().endswith("(truncated)")


async def test_an_unexpected_exception_is_internal_without_internals(server, caplog):
    async with grpc.aio.insecure_channel(server) as channel:
        _, err = await _generate(channel, "bug", request_id="rid-42")
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await gateway_pb2_grpc.GatewayStub(channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=10)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "rid-42" in err.details()
    for leak in ("Unlucky", "secret", "0x1234", "Traceback", "class"):
        assert leak not in err.details()
    assert any("rid-42" in r.getMessage() and r.exc_info for r in caplog.records), "the traceback is logged under the request id"
    assert unary.value.code() == grpc.StatusCode.INTERNAL and "KeyError" not in unary.value.details()


async def test_the_services_own_interceptors_still_decide_first(server):
    async with grpc.aio.insecure_channel(server) as channel:
        _, err = await _generate(channel, "service-interceptor")
        ok = [c.text async for c in gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(text="fine"), timeout=10)]
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "the engine is gone"
    assert ok == ["first", "done"]


class Aborting(gateway_pb2_grpc.GatewayServicer):
    async def ListWorkers(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "y" * 50_000)


async def test_a_handlers_own_abort_is_bounded_too():
    srv = grpc.aio.server(interceptors=[ErrorStatusInterceptor(), RequestDecodingInterceptor()])
    gateway_pb2_grpc.add_GatewayServicer_to_server(Aborting(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gateway_pb2_grpc.GatewayStub(channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=10)
    finally:
        await srv.stop(None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and len(err.value.details()) <= MAX_MESSAGE_CHARS
