"""Token id → the token's text, for logprobs in the OpenAI shape (which names tokens by text).

The workers return logprobs by token id. The tokenizer service decodes each id once (with special
tokens kept, so `<|im_end|>` shows as itself); the answers are cached per model, because a
vocabulary never changes, so after a short warm-up logprobs cost no extra call. Without a
tokenizer service (a model served by token ids only) a token is named `token_id:<id>`, vLLM's
`--return-tokens-as-token-ids` form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from protos.tandem.v1 import tokenizer_pb2
from services.common.errors import unavailable

MAX_CACHED = 1 << 18  # ids per model; more than any vocabulary served here


class TokenTexts:
    """Cached token texts, asked of the tokenizers in `pool` (mutates only its cache)."""

    def __init__(self, pool):
        self.pool = pool
        self._cache: dict[tuple[str, int], str] = {}

    async def lookup(self, ids: Iterable[int], timeout: float = 10.0) -> dict[int, str]:
        """The text of each id. Raises RequestError(UNAVAILABLE) when no tokenizer answers."""
        tokenizers = self.pool.registered("tokenizer")
        wanted = set(ids)
        if not tokenizers:
            return {t: f"token_id:{t}" for t in wanted}
        handle = tokenizers[0]
        model = handle.registration.model
        missing = [t for t in wanted if (model, t) not in self._cache]
        if missing:
            stub = handle.tokenizer_stub()
            replies = await asyncio.gather(
                *(stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[t], skip_special_tokens=False), timeout=timeout) for t in missing),
                return_exceptions=True,
            )
            if len(self._cache) + len(missing) > MAX_CACHED:
                self._cache.clear()
            for t, reply in zip(missing, replies):
                if isinstance(reply, grpc.aio.AioRpcError) and reply.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    text = f"token_id:{t}"  # an id past the tokenizer's vocabulary (a padded embedding row)
                elif isinstance(reply, grpc.aio.AioRpcError):
                    raise unavailable(f"the tokenizer could not name the logprobs' tokens: {reply.code().name}: {reply.details()}")
                elif isinstance(reply, BaseException):
                    raise reply  # a bug, not the tokenizer's answer: a 500 with an error id, logged there
                else:
                    text = reply.text
                self._cache[(model, t)] = text
        return {t: self._cache[(model, t)] for t in wanted}
