"""The tokenizer service: text and chat messages to token ids (HF tokenizers + the model's chat
template), and token ids back to text, whole or incrementally. No torch in this process.

Tokenizing, rendering a chat template and detokenizing run on a small thread pool
(`tokenizer_threads`), never on the event loop, so a big input cannot starve health checks, the
etcd lease refresh or other requests; requests beyond the pool's threads wait their turn. Input
is bounded before any of that work (`max_prompt_chars`, `max_chat_messages`): an oversized
request is INVALID_ARGUMENT after a length check, not after a pass over it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import CollectorRegistry, Counter

from protos.tandem.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.chat import chat_messages_to_dicts, check_chat_size
from services.common.config import ServiceConfig
from services.model_files.model_dir import resolve_model_dir
from services.model_files.tokenizer import Tokenizer


class TokenizerService(tokenizer_pb2_grpc.TokenizerServicer):
    service_names = (tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name,)

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.metrics_registry = CollectorRegistry()
        self.num_requests = Counter("tandem_tokenizer_requests", "Tokenizer RPCs", ["method"], registry=self.metrics_registry)
        self.num_tokens = Counter("tandem_tokenizer_tokens", "Tokens produced by Tokenize", registry=self.metrics_registry)
        self._pool = ThreadPoolExecutor(max_workers=config.tokenizer_threads, thread_name_prefix="tokenize")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(self, server)

    async def start(self) -> None:
        model_dir = await asyncio.get_running_loop().run_in_executor(None, resolve_model_dir, self.config.model)
        if not (model_dir / "tokenizer.json").is_file():
            raise ValueError(f"{model_dir} has no tokenizer.json; the tokenizer service needs one")
        self.tokenizer = Tokenizer(model_dir)

    def fill_registration(self, reg) -> None:
        reg.model = self.config.model

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.tokenizer = None

    async def _off_loop(self, fn, *args):
        """fn(*args) on the tokenizing threads. A cancelled call's thread finishes its (bounded) work."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- RPCs -----------------------------------------------------------------------------------

    def _render_chat(self, chat) -> str:
        """The chat's prompt text (runs on a tokenizing thread; the size was checked already)."""
        messages = chat_messages_to_dicts(chat)
        add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception() and jinja errors
            raise ValueError(f"chat template rejected the messages: {e}") from None

    def _check_chat(self, chat) -> None:
        check_chat_size(chat, self.config.max_chat_messages, self.config.max_prompt_chars)

    def _tokenize(self, request) -> tuple[list[int], str]:
        """(token ids, the rendered chat prompt or ""): on a tokenizing thread; raises ValueError."""
        if request.WhichOneof("input") == "chat":
            text = self._render_chat(request.chat)
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else False
            return self.tokenizer.encode(text, add_special_tokens=add_special), text
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return self.tokenizer.encode(request.text, add_special_tokens=add_special), ""

    async def Tokenize(self, request, context):
        self.num_requests.labels("Tokenize").inc()
        try:
            which = request.WhichOneof("input")
            if which == "chat":
                self._check_chat(request.chat)
            elif which == "text":
                if not request.text:
                    raise ValueError("text must not be empty")
                if len(request.text) > self.config.max_prompt_chars:
                    raise ValueError(f"text must be at most {self.config.max_prompt_chars} characters (max_prompt_chars), got {len(request.text)}")
            else:
                raise ValueError("set text or chat")
            ids, prompt_text = await self._off_loop(self._tokenize, request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.num_tokens.inc(len(ids))
        return tokenizer_pb2.TokenizeResponse(token_ids=ids, prompt_text=prompt_text)

    async def ApplyChatTemplate(self, request, context):
        self.num_requests.labels("ApplyChatTemplate").inc()
        try:
            self._check_chat(request.chat)
            return tokenizer_pb2.ApplyChatTemplateResponse(prompt_text=await self._off_loop(self._render_chat, request.chat))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _check_ids(self, ids, field: str) -> None:
        vocab = self.tokenizer.vocab_size
        for i, t in enumerate(ids):
            if t >= vocab:
                raise ValueError(f"{field}[{i}] = {t} is outside the vocabulary [0, {vocab})")

    def _detokenize(self, request) -> str:
        self._check_ids(request.token_ids, "token_ids")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return self.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)

    async def Detokenize(self, request, context):
        self.num_requests.labels("Detokenize").inc()
        if len(request.token_ids) > self.config.max_prompt_chars:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids must hold at most {self.config.max_prompt_chars} ids (max_prompt_chars), got {len(request.token_ids)}",
            )
        try:
            text = await self._off_loop(self._detokenize, request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def DetokenizeStream(self, request_iterator, context):
        self.num_requests.labels("DetokenizeStream").inc()
        detok = None
        async for request in request_iterator:
            try:
                if len(request.prompt_token_ids) + len(request.token_ids) > self.config.max_prompt_chars:
                    raise ValueError(f"a message holds more than {self.config.max_prompt_chars} token ids (max_prompt_chars)")
                if detok is None:
                    self._check_ids(request.prompt_token_ids, "prompt_token_ids")
                    skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
                    detok = self.tokenizer.decode_stream(list(request.prompt_token_ids), skip)
                elif request.prompt_token_ids:
                    raise ValueError("prompt_token_ids may only be set in the first message")
                self._check_ids(request.token_ids, "token_ids")
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            yield tokenizer_pb2.DetokenizeStreamResponse(text="".join(detok.step(t) for t in request.token_ids))

    async def GetInfo(self, request, context):
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return tokenizer_pb2.TokenizerInfo(
            model=self.config.model,
            vocab_size=tok.vocab_size,
            eos_token_ids=eos,
            has_chat_template=bool(tok.chat_template),
        )
