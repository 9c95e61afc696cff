"""Decode.GenerateMany end to end on a real grpc.aio server and channel: the worker's
GenerateManyStream (services/common/generate_many.py) over a scripted Generate handler, and the
gateway's DecodeMux/MuxCall (gateway/decode_mux.py). What is checked: each request behaves as its
own Generate call would (chunks in order, its own final status, its deadline, cancel frees it on
the worker), all of them share one stream whose messages carry several requests' chunks, and a
worker without GenerateMany still serves through Generate."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.decode_leg import RETRYABLE_CODES
from gateway.decode_mux import DecodeMux, MuxCall
from protos.tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.errors import RequestError
from services.common.generate_many import GenerateManyStream
from tests.helpers.waiting import eventually


class ScriptedDecode(worker_pb2_grpc.DecodeServicer):
    """Generate streams `len(prompt_token_ids)` tokens, one per `step` (all requests in lockstep,
    as an engine's steps are); prompt token 0 aborts with INVALID_ARGUMENT, 90 raises a RequestError
    (RESOURCE_EXHAUSTED), 91 an unexpected exception; a token 1 is never
    reached (the request hangs there).
    Records every GenerateMany call, every batch size, and the requests that were closed early."""

    def __init__(self, many: bool = True):
        self.step = asyncio.Event()
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.closed_early: list[str] = []
        if not many:
            self.GenerateMany = None  # an older worker: the method is not registered

    async def Generate(self, request, context):
        if request.prompt_token_ids[0] == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {request.request_id}: bad prompt")
        if request.prompt_token_ids[0] == 90:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room for the prompt")
        if request.prompt_token_ids[0] == 91:
            raise RuntimeError("a bug")
        try:
            for i, token in enumerate(request.prompt_token_ids):
                if token == 1:
                    await asyncio.Event().wait()
                await self.step.wait()
                last = i == len(request.prompt_token_ids) - 1
                yield common_pb2.GenerateResponse(request_id=request.request_id, token_ids=[token],
                                                  finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0)  # fmt: skip
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_early.append(request.request_id)
            raise

    async def GenerateMany(self, controls, context):
        self.calls += 1
        async for batch in GenerateManyStream(self.Generate).serve(controls):
            self.batch_sizes.append(len(batch.items))
            yield batch


@pytest.fixture
async def worker():
    servers = []

    async def start(many: bool = True):
        servicer = ScriptedDecode(many)
        server = grpc.aio.server()
        handlers = {"Generate": grpc.unary_stream_rpc_method_handler(servicer.Generate, worker_pb2.WorkerGenerateRequest.FromString,
                                                                     common_pb2.GenerateResponse.SerializeToString)}  # fmt: skip
        if many:
            handlers["GenerateMany"] = grpc.stream_stream_rpc_method_handler(servicer.GenerateMany, worker_pb2.DecodeControl.FromString,
                                                                             worker_pb2.DecodeBatch.SerializeToString)  # fmt: skip
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tandem.v1.Decode", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        return servicer, server, channel

    yield start
    for server, channel in servers:
        await channel.close()
        await server.stop(None)


def request(rid: str, tokens: list[int]) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=rid, prompt_token_ids=tokens)


async def collect(call) -> list[int]:
    return [t async for chunk in call for t in chunk.token_ids]


async def tick(servicer: ScriptedDecode, until) -> None:
    """Let the scripted engine step until `until()` holds (bounded)."""
    for _ in range(400):
        if until():
            return
        servicer.step.set()
        await asyncio.sleep(0.005)
        servicer.step.clear()
        await asyncio.sleep(0.005)
    raise AssertionError("the requests did not finish")


async def test_many_requests_share_one_stream_and_one_message_per_step(worker):
    servicer, _, channel = await worker()
    mux = DecodeMux("decode-0")
    tasks = [asyncio.create_task(collect(MuxCall(mux, channel, request("same-id", [10 + i, 20 + i, 30 + i]), timeout=30))) for i in range(8)]
    await tick(servicer, lambda: all(t.done() for t in tasks))
    assert [t.result() for t in tasks] == [[10 + i, 20 + i, 30 + i] for i in range(8)]  # one request id for all: kept apart
    assert servicer.calls == 1
    assert max(servicer.batch_sizes) > 1  # a step's chunks of several requests travel in one message
    mux.close()


async def test_a_failing_request_gets_its_own_status_and_the_others_go_on(worker):
    servicer, _, channel = await worker()
    mux = DecodeMux("decode-0")
    good = asyncio.create_task(collect(MuxCall(mux, channel, request("good", [5, 6]), timeout=30)))
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await collect(MuxCall(mux, channel, request("bad", [0, 1]), timeout=30))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request bad: bad prompt" in bad.value.details()
    await tick(servicer, good.done)
    assert good.result() == [5, 6]
    mux.close()


async def test_a_raising_handler_gets_the_status_a_generate_call_would(worker):
    _, _, channel = await worker()
    mux = DecodeMux("decode-0")
    with pytest.raises(grpc.aio.AioRpcError) as exhausted:
        await collect(MuxCall(mux, channel, request("big", [90]), timeout=30))
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and exhausted.value.details() == "no room for the prompt"
    with pytest.raises(grpc.aio.AioRpcError) as bug:
        await collect(MuxCall(mux, channel, request("buggy", [91]), timeout=30))
    assert bug.value.code() == grpc.StatusCode.INTERNAL
    assert "request buggy" in bug.value.details() and "a bug" not in bug.value.details()  # nothing internal leaks
    mux.close()


async def test_cancel_aborts_the_request_on_the_worker(worker):
    servicer, _, channel = await worker()
    mux = DecodeMux("decode-0")
    call = MuxCall(mux, channel, request("left", [7, 1, 9]), timeout=30)
    chunks = call.__aiter__()
    reader = asyncio.create_task(anext(chunks))
    await tick(servicer, reader.done)
    assert reader.result().token_ids == [7]
    assert call.cancel()
    await eventually(lambda: servicer.closed_early == ["left"], "the worker to abort the cancelled request", timeout=10)
    assert not call.cancel()  # once only
    await chunks.aclose()
    mux.close()


async def test_a_deadline_ends_the_request_on_both_ends(worker):
    servicer, _, channel = await worker()
    mux = DecodeMux("decode-0")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(MuxCall(mux, channel, request("slow", [1, 2]), timeout=0.3))  # token 1: never answers
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: servicer.closed_early == ["slow"], "the worker to drop the expired request", timeout=10)
    mux.close()


async def test_a_broken_stream_fails_every_request_on_it_with_a_retryable_status_and_the_next_opens_a_new_one(worker):
    servicer, server, channel = await worker()
    mux = DecodeMux("decode-0")
    tasks = [asyncio.create_task(collect(MuxCall(mux, channel, request(f"r{i}", [1, 2]), timeout=30))) for i in range(3)]
    await eventually(lambda: len(servicer.closed_early) == 0 and servicer.calls == 1, "the stream to open", timeout=10)
    await asyncio.sleep(0.1)
    await server.stop(None)  # the worker goes away mid-stream
    for t in tasks:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(t, 10)
        assert e.value.code() in RETRYABLE_CODES  # the decode leg moves each request to another worker
    servicer2, _, channel2 = await worker()
    call = MuxCall(mux, channel2, request("after", [3]), timeout=30)
    task = asyncio.create_task(collect(call))
    await tick(servicer2, task.done)
    assert task.result() == [3] and servicer2.calls == 1
    mux.close()


async def test_a_worker_without_generate_many_is_served_by_generate_calls(worker):
    servicer, _, channel = await worker(many=False)
    mux = DecodeMux("decode-old")
    first = asyncio.create_task(collect(MuxCall(mux, channel, request("a", [4, 5]), timeout=30)))
    await tick(servicer, first.done)
    assert first.result() == [4, 5] and mux.unsupported
    second = asyncio.create_task(collect(MuxCall(mux, channel, request("b", [6]), timeout=30)))
    await tick(servicer, second.done)
    assert second.result() == [6]
