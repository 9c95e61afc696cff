"""POST /v1/completions and /v1/chat/completions: one HTTP request through the gateway's request path.

    body ─parse_request─► GenerateRequests (one per prompt) ─validate_request─► model known?
         ─Choices(GatewayService.generate)─► stream: wait for every choice's first chunk, then
                                                     SSE `data: {chunk}` … [usage chunk] `data: [DONE]`
                                             or not: collect, one JSON response

Every failure before the first byte is an HTTP error status with the OpenAI error object; one after
it (a worker lost mid-stream) is a `data: {"error": …}` event followed by `data: [DONE]`, as vLLM
sends it. A client that disconnects cancels the handler (aiohttp's handler_cancellation), which
cancels every choice's calls to the workers, so they free the request's KV blocks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from services.common.errors import RequestError

from ..request_validation import MAX_REQUEST_ID_LEN, RequestLimits, validate_request
from .choices import Choices, HttpCallContext
from .errors import ApiError, from_request_error, invalid_field
from .json_body import parse_json_body
from .request_parsing import OpenAIRequest, parse_request
from .responses import ChoiceState, Responder
from .token_texts import TokenTexts

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def read_json(request: web.Request):
    """The body as JSON, or ApiError 400 (json_body.py); aiohttp refuses a body over the limit (413)."""
    return parse_json_body(await request.read())


class CompletionEndpoints:
    """The two generation endpoints of one gateway (`service`: its GatewayService)."""

    def __init__(self, service):
        self.service = service
        self.token_texts = TokenTexts(service.pool)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    def model_name(self, asked: str) -> str:
        """The model the response names: the one asked for, or the one served. Raises ApiError
        404 (model_not_found) when the cluster serves others."""
        served = self.service.served_models()
        if asked and served and asked not in served:
            raise ApiError(404, f"the model {asked!r} does not exist here; served: {', '.join(sorted(served))}", param="model", code="model_not_found")
        return asked or (next(iter(served)) if len(served) == 1 else "")

    def _request_id(self, request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id", "")
        if not rid:
            return uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID_LEN - 8 or not rid.isprintable():
            raise invalid_field(None, f"the X-Request-Id header must be at most {MAX_REQUEST_ID_LEN - 8} printable characters")
        return rid

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        parsed = parse_request(await read_json(request), kind)
        model = self.model_name(parsed.model)
        rid = self._request_id(request)
        served = set(self.service.served_models())
        limits = RequestLimits.from_config(self.service.config)
        for i, r in enumerate(parsed.requests):
            r.request_id = rid if len(parsed.requests) == 1 else f"{rid}-{i}"
            try:
                validate_request(r, served, limits)  # the same checks the path makes, before a stream starts
            except RequestError as e:
                raise from_request_error(e) from None
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        responder = Responder(kind, f"{prefix}-{rid}", model, int(time.time()), parsed.num_logprobs, parsed.return_token_ids)
        async with Choices(self.service.generate, parsed.requests, HttpCallContext(request.headers)) as choices:
            try:
                if not parsed.stream:
                    return web.json_response(await self._collect(choices, responder, parsed), headers={"X-Request-Id": rid})
                await choices.started()
            except RequestError as e:
                raise from_request_error(e) from None
            return await self._stream(request, choices, responder, parsed, rid)

    async def _texts(self, parsed: OpenAIRequest, responder: Responder, entries) -> dict[int, str]:
        if parsed.num_logprobs is None or not entries:
            return {}
        return await self.token_texts.lookup(responder.logprob_ids(entries))

    async def _collect(self, choices: Choices, responder: Responder, parsed: OpenAIRequest) -> dict:
        states = [ChoiceState(i) for i in range(len(parsed.requests))]
        async for index, chunk in choices:
            states[index].add(chunk, {})
        texts = await self._texts(parsed, responder, [e for s in states for e in s.logprobs])
        return responder.full(states, texts)

    async def _stream(self, request: web.Request, choices: Choices, responder: Responder, parsed: OpenAIRequest, rid: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": rid})
        await response.prepare(request)
        states = [ChoiceState(i) for i in range(len(parsed.requests))]
        try:
            if parsed.kind == "chat":
                for s in states:
                    await response.write(sse(responder.role_chunk(s.index, parsed.include_usage)))
            try:
                async for index, chunk in choices:
                    texts = await self._texts(parsed, responder, chunk.logprobs)
                    await response.write(sse(responder.chunk(states[index], chunk, texts, parsed.include_usage)))
                    states[index].add(chunk, texts)
                if parsed.include_usage:
                    await response.write(sse(responder.usage_chunk([s.usage for s in states if s.usage is not None])))
            except RequestError as e:
                await response.write(sse(from_request_error(e).to_json()))
            except ConnectionError:
                raise
            except Exception:  # noqa: BLE001 - a bug: the headers are sent, so it can only be an event
                log.exception("streaming %s failed", rid)
                await response.write(
                    sse(ApiError(500, f"internal error in the gateway while serving request {rid}; its log has the details", code="internal_error").to_json())
                )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client left between chunks; leaving Choices cancels the rest
            pass
        return response
