"""The tokenizer service: text and chat messages to token ids (HF tokenizers + the model's chat
template), and token ids back to text, whole or incrementally. No torch in this process."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry, Counter

from protos.tandem.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.chat import chat_messages_to_dicts
from services.common.config import ServiceConfig
from services.engine.model_dir import resolve_model_dir
from services.engine.tokenizer import Tokenizer

class TokenizerService(tokenizer_pb2_grpc.TokenizerServicer):
    service_names = (tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name,)

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.metrics_registry = CollectorRegistry()
        self.num_requests = Counter("tandem_tokenizer_requests", "Tokenizer RPCs", ["method"], registry=self.metrics_registry)
        self.num_tokens = Counter("tandem_tokenizer_tokens", "Tokens produced by Tokenize", registry=self.metrics_registry)

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
        self.tokenizer = None

    # ---- RPCs -----------------------------------------------------------------------------------

    def _render_chat(self, chat) -> str:
        messages = chat_messages_to_dicts(chat)
        add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception() and jinja errors
            raise ValueError(f"chat template rejected the messages: {e}") from None

    async def Tokenize(self, request, context):
        self.num_requests.labels("Tokenize").inc()
        try:
            which = request.WhichOneof("input")
            if which == "chat":
                text = self._render_chat(request.chat)
                add_special = request.add_special_tokens if request.HasField("add_special_tokens") else False
            elif which == "text":
                if not request.text:
                    raise ValueError("text must not be empty")
                text = request.text
                add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            else:
                raise ValueError("set text or chat")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special)
        self.num_tokens.inc(len(ids))
        return tokenizer_pb2.TokenizeResponse(token_ids=ids, prompt_text=text if which == "chat" else "")

    async def ApplyChatTemplate(self, request, context):
        self.num_requests.labels("ApplyChatTemplate").inc()
        try:
            return tokenizer_pb2.ApplyChatTemplateResponse(prompt_text=self._render_chat(request.chat))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _check_ids(self, ids, field: str) -> None:
        vocab = self.tokenizer.vocab_size
        for i, t in enumerate(ids):
            if t >= vocab:
                raise ValueError(f"{field}[{i}] = {t} is outside the vocabulary [0, {vocab})")

    async def Detokenize(self, request, context):
        self.num_requests.labels("Detokenize").inc()
        try:
            self._check_ids(request.token_ids, "token_ids")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return tokenizer_pb2.DetokenizeResponse(text=self.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip))

    async def DetokenizeStream(self, request_iterator, context):
        self.num_requests.labels("DetokenizeStream").inc()
        detok = None
        async for request in request_iterator:
            try:
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
