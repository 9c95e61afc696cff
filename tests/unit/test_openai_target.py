"""The bench's OpenAI target reads other servers' streams too: a small aiohttp server replays
event sequences shaped as vLLM sends them (no token ids unless asked, usage in a last event with no
choices, errors as events with an integer code), and the target's chunks are what the runner needs."""

from __future__ import annotations

import json

import grpc
import pytest
from aiohttp import web

from loadtest.openai_target import OpenAITarget
from loadtest.targets import SamplingOptions
from loadtest.workloads.base import RequestSpec
from protos.tandem.v1 import common_pb2


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def completion(text, finish=None, **extra) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish, **extra}]}


STREAMS = {
    "plain": sse(
        completion("Hel"),
        completion("lo"),
        completion("!", "length"),
        {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}},
        b"[DONE]",
    ),
    "ids": sse(
        completion("a", token_ids=[7, 8]),
        completion("", "stop", token_ids=[2]),
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "prompt_tokens_details": None}},
        b"[DONE]",
    ),
    "no-usage": sse(completion("x"), completion("y", "stop"), b"[DONE]"),
    "error-event": sse(completion("x"), {"error": {"object": "error", "message": "engine died", "type": "InternalServerError", "code": 503}}, b"[DONE]"),
}


@pytest.fixture
async def server():
    seen: list[dict] = []

    async def completions(request: web.Request):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("Authorization"), "request_id": request.headers.get("X-Request-Id")})
        if body["prompt"] == "too long":
            return web.json_response({"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(STREAMS[body["prompt"]])
        return response

    async def models(request: web.Request):
        return web.json_response({"object": "list", "data": [{"id": "served-model", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1", seen
    await runner.cleanup()


async def chunks_of(target: OpenAITarget, prompt: str) -> list[common_pb2.GenerateResponse]:
    return [c async for c in target.generate(RequestSpec(max_tokens=3, text=prompt), "req-9", 0, timeout=10)]


async def test_events_become_the_runners_chunks(server):
    url, seen = server
    async with OpenAITarget(url, SamplingOptions(temperature=0.0, top_k=5, seed=10), api_key="k", cache_salt="salt") as target:
        await target.wait_ready(5)
        assert target.model == "served-model"
        chunks = await chunks_of(target, "plain")
    assert [(c.text, list(c.token_ids)) for c in chunks[:-1]] == [("Hel", [0]), ("lo", [0]), ("!", [0])]  # one token per text event
    final = chunks[-1]
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH and not final.token_ids
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.cached_prompt_tokens) == (4, 3, 2)
    body = seen[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["return_token_ids"] is True
    assert (body["model"], body["max_tokens"], body["top_k"], body["seed"], body["ignore_eos"], body["cache_salt"]) == ("served-model", 3, 5, 10, True, "salt")
    assert (seen[0]["auth"], seen[0]["request_id"]) == ("Bearer k", "req-9")


async def test_token_ids_when_the_server_returns_them_and_a_stream_without_usage(server):
    url, _ = server
    async with OpenAITarget(url, SamplingOptions(), model="m") as target:
        ids = await chunks_of(target, "ids")
        plain = await chunks_of(target, "no-usage")
    assert [list(c.token_ids) for c in ids] == [[7, 8], [2], []] and ids[-1].usage.cached_prompt_tokens == 0
    assert plain[-1].finish_reason == common_pb2.FINISH_REASON_STOP and not plain[-1].HasField("usage")


async def test_errors_become_grpc_status_codes(server):
    url, _ = server
    async with OpenAITarget(url, SamplingOptions(), model="m") as target:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await chunks_of(target, "too long")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "HTTP 400: prompt too long"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await chunks_of(target, "error-event")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine died" in err.value.details()


def test_a_base_url_must_be_http():
    with pytest.raises(ValueError, match="--base-url"):
        OpenAITarget("127.0.0.1:8000", SamplingOptions())
