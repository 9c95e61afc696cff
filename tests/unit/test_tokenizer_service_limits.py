"""The tokenizer service bounds its input before tokenizing, and tokenizes off the event loop."""

from __future__ import annotations

import threading

import grpc
import pytest

from protos.tandem.v1 import common_pb2, tokenizer_pb2
from services.common.config import ServiceConfig
from services.tokenizer.service import TokenizerService


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    async def abort(self, code, details):
        raise Aborted(code, details)


@pytest.fixture
async def service(default_model_dir):
    svc = TokenizerService(ServiceConfig(role="tokenizer", model=str(default_model_dir), max_prompt_chars=1000, max_chat_messages=8, tokenizer_threads=1))
    await svc.start()
    yield svc
    await svc.close()


def chat(n: int, content: str = "hi") -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=content) for _ in range(n)])


@pytest.mark.parametrize(
    "request_, field",
    [
        (tokenizer_pb2.TokenizeRequest(text="x" * 1001), "text must be at most 1000 characters"),
        (tokenizer_pb2.TokenizeRequest(chat=chat(100_000)), "chat.messages must hold at most 8 messages (max_chat_messages), got 100000"),
        (tokenizer_pb2.TokenizeRequest(chat=chat(2, "y" * 600)), "at most 1000 characters in all"),
    ],
)
async def test_oversized_input_is_refused_before_tokenizing(service, monkeypatch, request_, field):
    def forbidden(*args, **kwargs):
        raise AssertionError("tokenized an input that is over the limit")

    monkeypatch.setattr(service.tokenizer, "encode", forbidden)
    monkeypatch.setattr(service.tokenizer, "apply_chat_template", forbidden)
    with pytest.raises(Aborted) as err:
        await service.Tokenize(request_, Context())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details
    with pytest.raises(Aborted):
        await service.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(chat=chat(9)), Context())


async def test_tokenizing_and_templates_run_off_the_event_loop(service, monkeypatch):
    threads = []
    encode, render = service.tokenizer.encode, service.tokenizer.apply_chat_template

    def recording(fn):
        def call(*args, **kwargs):
            threads.append(threading.current_thread())
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(service.tokenizer, "encode", recording(encode))
    monkeypatch.setattr(service.tokenizer, "apply_chat_template", recording(render))
    text_reply = await service.Tokenize(tokenizer_pb2.TokenizeRequest(text="hello world"), Context())
    chat_reply = await service.Tokenize(tokenizer_pb2.TokenizeRequest(chat=chat(2)), Context())
    assert text_reply.token_ids and chat_reply.token_ids and "hi" in chat_reply.prompt_text
    assert len(threads) == 3 and all(t is not threading.main_thread() for t in threads)
    detok = await service.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=text_reply.token_ids), Context())
    assert detok.text == "hello world"
    with pytest.raises(Aborted) as err:
        await service.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[5] * 1001), Context())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in err.value.details
