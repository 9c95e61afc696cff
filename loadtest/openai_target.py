"""What the load runner talks to over HTTP: any OpenAI-compatible server, Tandem's gateway included.

    OpenAITarget   POST {base_url}/completions        token ids or text prompts
                   POST {base_url}/chat/completions   chat messages
                   streamed (SSE), stream_options.include_usage, so the last event carries the
                   usage: prompt, completion and cached prompt tokens (prompt_tokens_details)

The same workloads, load shapes and metrics as the gRPC targets, so Tandem and another server
(vLLM, SGLang, ...) are measured under identical load. Each SSE event becomes the GenerateResponse
the runner records: the text, the token ids when the server returns them (vLLM's
`return_token_ids` extension, which Tandem and vLLM ≥ 0.10.2 honour; asked for unless
`return_token_ids=False`), else one token per text-bearing event, as `vllm bench serve` counts
them; usage.completion_tokens corrects the total at the end. The runner records gRPC status
names, so an HTTP error is recorded under the matching code (HTTP 429 → RESOURCE_EXHAUSTED, ...)
with details starting "HTTP <status>".

Imports aiohttp and protos only: no torch, engine or gateway (tests/unit/test_light_imports.py).
"""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import grpc

from protos.tandem.v1 import common_pb2

from .targets import SamplingOptions
from .workloads.base import RequestSpec

FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH, "abort": common_pb2.FINISH_REASON_ABORT}
GRPC_CODE_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
                     404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.INVALID_ARGUMENT,
                     429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}  # fmt: skip
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class OpenAIHTTPError(grpc.aio.AioRpcError):
    """An HTTP failure, recorded by the runner as the gRPC status it corresponds to."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def error_of(status: int, body: str) -> OpenAIHTTPError:
    """The runner's record of an error response: the OpenAI error object's message when there is one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:300]
    code = GRPC_CODE_OF_HTTP.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN)
    return OpenAIHTTPError(code, f"HTTP {status}: {message}")


def stream_error(err: dict) -> OpenAIHTTPError:
    """An error event inside a stream (sent after the 200): its code is an HTTP status (vLLM) or a
    gRPC status name (Tandem)."""
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, int):
        grpc_code = GRPC_CODE_OF_HTTP.get(code, grpc.StatusCode.INTERNAL)
    else:
        grpc_code = grpc.StatusCode.__members__.get(str(code or "").upper(), grpc.StatusCode.INTERNAL)
    message = err.get("message") if isinstance(err, dict) else err
    return OpenAIHTTPError(grpc_code, f"error event in the stream: {message}")


class OpenAITarget:
    kind = "openai"

    def __init__(self, base_url: str, sampling: SamplingOptions, model: str | None = None, api_key: str | None = None,
                 return_token_ids: bool = True, cache_salt: str = "", tls_ca: str | None = None):  # fmt: skip
        """`model`: None = the first the server lists. `cache_salt` may change between runs (vLLM
        and Tandem isolate prefix caches by it; a server without it ignores the field)."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must be an http(s) URL such as {DEFAULT_BASE_URL}, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.sampling = sampling
        self.model = model
        self.return_token_ids = return_token_ids
        self.cache_salt = cache_salt
        self.tls_ca = tls_ca  # a CA file for an https base URL whose certificate it signed (default: the system's)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._models: list[str] = []

    async def __aenter__(self) -> "OpenAITarget":
        # no connection cap: the load shape decides how many requests are in flight
        ssl_context = ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else True
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context), headers=self._headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def wait_ready(self, timeout: float) -> None:
        """Poll GET /models until it answers; pick the model. Raises ConnectionError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = ""
        while True:
            try:
                async with self._session.get(f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    body = await r.text()
                    if r.status == 200:
                        self._models = [m["id"] for m in json.loads(body).get("data", [])]
                        break
                    last = f"HTTP {r.status}: {body.strip()[:200]}"
                    if r.status in (401, 403, 404):
                        raise ConnectionError(f"{self.base_url}/models answered {last}")
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                last = str(e) or type(e).__name__
            if loop.time() >= deadline:
                raise ConnectionError(f"no OpenAI-compatible server answers at {self.base_url} after {timeout:.0f}s ({last}); "
                                      "`tandem up` prints its HTTP base URL")  # fmt: skip
            await asyncio.sleep(0.5)
        if self.model is None:
            if not self._models:
                raise ConnectionError(f"{self.base_url}/models lists no model; pass --model")
            self.model = self._models[0]

    def build(self, spec: RequestSpec, index: int) -> tuple[str, dict]:
        """The endpoint and JSON body of one request."""
        s = self.sampling
        body: dict = {
            "model": self.model,
            "max_tokens": spec.max_tokens,
            "temperature": s.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.top_k is not None:
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed + index
        if s.ignore_eos:
            body["ignore_eos"] = True
        if self.cache_salt:
            body["cache_salt"] = self.cache_salt
        if self.return_token_ids:
            body["return_token_ids"] = True
        if spec.messages is not None:
            body["messages"] = [{"role": role, "content": content} for role, content in spec.messages]
            return "chat/completions", body
        body["prompt"] = spec.token_ids if spec.token_ids is not None else spec.text
        return "completions", body

    def generate(self, spec: RequestSpec, request_id: str, index: int, timeout: float | None) -> "OpenAIStream":
        endpoint, body = self.build(spec, index)
        return OpenAIStream(self._session, f"{self.base_url}/{endpoint}", body, request_id, timeout)

    async def describe(self) -> dict:
        return {"kind": self.kind, "address": self.base_url, "model_id": self.model, "models": self._models, "return_token_ids": self.return_token_ids}


class OpenAIStream:
    """One streamed request: async-iterable GenerateResponses; `cancel()` drops the connection,
    which an OpenAI-compatible server takes as the client giving up."""

    def __init__(self, session: aiohttp.ClientSession, url: str, body: dict, request_id: str, timeout: float | None):
        self._session, self._url, self._body, self._request_id, self._timeout = session, url, body, request_id, timeout
        self._response: aiohttp.ClientResponse | None = None

    def cancel(self) -> None:
        if self._response is not None:
            self._response.close()

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with self._session.post(self._url, json=self._body, headers={"X-Request-Id": self._request_id}, timeout=timeout) as r:
                self._response = r
                if r.status != 200:
                    raise error_of(r.status, await r.text())
                finish = None
                async for line in r.content:
                    data = line.strip()
                    if not data.startswith(b"data:"):
                        continue
                    data = data[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise stream_error(event["error"])
                    chunk, reason = self._chunk(event)
                    finish = reason or finish
                    if chunk is not None:
                        yield chunk
                    if event.get("usage"):  # the last event (include_usage): finish and usage together
                        yield self._final(finish, event["usage"])
                        finish = None
                if finish is not None:  # a server that sent no usage event
                    yield common_pb2.GenerateResponse(request_id=self._request_id, finish_reason=finish)
        except TimeoutError:
            raise OpenAIHTTPError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end of stream after {self._timeout:.0f}s (client timeout)") from None
        except aiohttp.ClientError as e:
            raise OpenAIHTTPError(grpc.StatusCode.UNAVAILABLE, f"HTTP connection failed: {e}") from None

    def _chunk(self, event: dict) -> tuple[common_pb2.GenerateResponse | None, int | None]:
        """The tokens of one event (None when it has none), and its finish reason."""
        choices = event.get("choices") or []
        if not choices:
            return None, None
        choice = choices[0]
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        text = text or ""
        ids = choice.get("token_ids")
        if ids is None:
            ids = [0] if text else []  # token ids unknown: one token per text-bearing event
        reason = choice.get("finish_reason")
        finish = FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_STOP) if reason else None
        if not ids and not text:
            return None, finish
        return common_pb2.GenerateResponse(request_id=self._request_id, token_ids=ids, text=text), finish

    def _final(self, finish: int | None, usage: dict) -> common_pb2.GenerateResponse:
        details = usage.get("prompt_tokens_details") or {}
        return common_pb2.GenerateResponse(
            request_id=self._request_id,
            finish_reason=finish or common_pb2.FINISH_REASON_UNSPECIFIED,
            usage=common_pb2.Usage(
                prompt_tokens=usage.get("prompt_tokens") or 0,
                completion_tokens=usage.get("completion_tokens") or 0,
                cached_prompt_tokens=details.get("cached_tokens") or 0,
            ),  # fmt: skip
        )
