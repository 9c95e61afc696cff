"""Tokenize: the request's prompt as token ids, within the gateway's max_prompt_tokens.

    token_ids         → as sent (the client tokenized)
    text / chat       → Tokenizer.Tokenize (the chat template applied for chat) on a tokenizer
                        service, round robin; one that is UNAVAILABLE is skipped for the next,
                        any other status is the request's fault and ends it with that status

No tokenizer registered, or none reachable: UNAVAILABLE naming the etcd prefix or the last error.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from protos.tandem.v1 import gateway_pb2, tokenizer_pb2
from services.common.errors import RequestError, invalid, unavailable
from services.common.registry import workers_prefix


class TokenizeStep:
    """Turns prompts into token ids on the pool's tokenizers. Event-loop only (the round-robin
    turn is shared by every request)."""

    def __init__(self, pool, cluster: str, max_prompt_tokens: int = 0):
        self.pool = pool
        self.cluster = cluster
        self.max_prompt_tokens = max_prompt_tokens  # 0 = no limit beyond the model's context
        self._turn = 0

    async def prompt_token_ids(self, request: gateway_pb2.GenerateRequest, remaining: Callable[[], float | None]) -> list[int]:
        """The prompt's token ids. `remaining()`: the client's time left (raises RequestError when
        it is up). Raises RequestError: UNAVAILABLE, a tokenizer's own status, or INVALID_ARGUMENT
        for a prompt over max_prompt_tokens."""
        prompt_ids = await self._tokenize(request, remaining)
        limit = self.max_prompt_tokens
        if limit and len(prompt_ids) > limit:
            raise invalid(f"prompt is {len(prompt_ids)} tokens but this gateway accepts at most {limit} (max_prompt_tokens); shorten the prompt")
        return prompt_ids

    async def _tokenize(self, request: gateway_pb2.GenerateRequest, remaining: Callable[[], float | None]) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            return list(request.token_ids.ids)
        tok_request = tokenizer_pb2.TokenizeRequest(text=request.text) if which == "text" else tokenizer_pb2.TokenizeRequest(chat=request.chat)
        tokenizers = self.pool.registered("tokenizer")
        if not tokenizers:
            raise unavailable(
                f"no tokenizer service is registered (etcd prefix {workers_prefix(self.cluster)}tokenizer/); start one with `tandem serve tokenizer`"
            )
        last_error = None
        for i in range(len(tokenizers)):  # round robin, moving on when one is unreachable
            handle = tokenizers[(self._turn + i) % len(tokenizers)]
            try:
                reply = await handle.tokenizer_stub().Tokenize(tok_request, timeout=remaining())
                self._turn += i + 1
                return list(reply.token_ids)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise RequestError(e.code(), e.details()) from None
                last_error = e
        raise unavailable(f"no tokenizer could be reached ({len(tokenizers)} registered): {last_error.details()}")
