"""Generate through the gateway: the same tokens as the offline engine, chat, stop strings, usage,
and the tokenizer and prefill RPCs on their own."""

from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.engine import SamplingParams
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


def generate(channel, request: gateway_pb2.GenerateRequest, timeout: float = 120) -> list[common_pb2.GenerateResponse]:
    return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout))


def greedy(max_tokens: int, **kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_tokens_equal_the_offline_engine(gateway_channel, offline_llm, prompt):
    chunks = generate(gateway_channel, gateway_pb2.GenerateRequest(text=prompt, sampling=greedy(24, ignore_eos=True)))
    expected = offline_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert tokens_of(chunks) == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert len(chunks) > 1, "the answer must be streamed, not sent in one piece"
    assert [c.finish_reason for c in chunks[:-1]] == [common_pb2.FINISH_REASON_UNSPECIFIED] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_token_ids_in_give_the_same_answer_as_text(gateway_channel, offline_llm):
    ids = offline_llm.engine.tokenizer.encode(PROMPTS[0])
    by_ids = generate(gateway_channel, gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), sampling=greedy(12)))
    by_text = generate(gateway_channel, gateway_pb2.GenerateRequest(text=PROMPTS[0], sampling=greedy(12)))
    assert tokens_of(by_ids) == tokens_of(by_text)
    assert by_ids[-1].usage.prompt_tokens == len(ids)


def test_chat_goes_through_the_tokenizers_template(gateway_channel, offline_llm):
    question = "What is the capital of France?"
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=question)])
    chunks = generate(gateway_channel, gateway_pb2.GenerateRequest(chat=chat, sampling=greedy(32)))
    expected = offline_llm.chat([{"role": "user", "content": question}], SamplingParams(max_tokens=32, temperature=0.0))
    assert tokens_of(chunks) == expected.token_ids
    assert "Paris" in "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    templated = offline_llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    assert chunks[-1].usage.prompt_tokens == len(offline_llm.engine.tokenizer.encode(templated, add_special_tokens=False))


def test_stop_string_ends_the_stream_without_showing_it(gateway_channel, offline_llm):
    prompt = "Count: 1, 2, 3, 4, 5,"
    free = offline_llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].text
    assert " 8" in free, f"the reference continuation changed: {free!r}"
    chunks = generate(gateway_channel, gateway_pb2.GenerateRequest(text=prompt, sampling=greedy(20, stop=[" 8"], ignore_eos=True)))
    text = "".join(c.text for c in chunks)
    assert text == free[: free.index(" 8")]
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.WhichOneof("stop_reason") == "stop_string" and last.stop_string == " 8"


def test_usage_counts_prompt_completion_and_cached_tokens(gateway_channel):
    # long enough for several full KV blocks; unique so nothing is cached before the first run
    prompt = "Usage accounting check. " + " ".join(f"item{i}" for i in range(60))
    request = gateway_pb2.GenerateRequest(text=prompt, sampling=greedy(5, ignore_eos=True))
    first = generate(gateway_channel, request)[-1].usage
    second = generate(gateway_channel, request)[-1].usage
    assert first.completion_tokens == 5 and second.completion_tokens == 5
    assert first.prompt_tokens == second.prompt_tokens > 48
    assert first.cached_prompt_tokens == 0
    # the second run reuses every full block of the prompt (block size 16)
    assert second.cached_prompt_tokens == (second.prompt_tokens - 1) // 16 * 16


def test_tokenizer_service_round_trip(cluster):
    with grpc.insecure_channel(cluster.service("tokenizer").address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        text = "Grüße aus Köln 🚀 — naïve café"
        ids = list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text)).token_ids)
        assert stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=ids)).text == text
        # incremental: one token per message; multi-byte characters never come out split
        requests = [tokenizer_pb2.DetokenizeStreamRequest(token_ids=[t]) for t in ids]
        deltas = [r.text for r in stub.DetokenizeStream(iter(requests), timeout=30)]
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)
        chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="hi")])
        rendered = stub.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(chat=chat)).prompt_text
        assert "hi" in rendered and rendered.endswith("assistant\n")
        info = stub.GetInfo(tokenizer_pb2.GetInfoRequest())
        assert info.vocab_size > 0 and info.has_chat_template and info.eos_token_ids


def test_prefill_worker_returns_the_first_token(cluster, offline_llm):
    ids = offline_llm.engine.tokenizer.encode(PROMPTS[1])
    expected = offline_llm.generate(PROMPTS[1], SamplingParams(max_tokens=1, temperature=0.0))[0]
    with grpc.insecure_channel(cluster.service("prefill-0").address) as channel:
        reply = worker_pb2_grpc.PrefillStub(channel).Prefill(
            worker_pb2.PrefillRequest(
                request_id="prefill-test",
                prompt_token_ids=ids,
                sampling=greedy(8),
                decode_worker_id="nobody",
                decode_kv_address=b"unused: this test releases the handle",
            ),
            timeout=60,
        )
        assert list(reply.first.token_ids) == expected.token_ids
        assert reply.first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED  # decode would continue
        # the prompt's blocks wait for a decode worker under the handle; releasing it frees them
        handle = reply.kv_handle
        assert handle.num_tokens == len(ids) and list(handle.block_ids) and len(handle.transfer_token) == 16
        worker = worker_pb2_grpc.WorkerStub(channel)
        assert worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=10).num_used_blocks == len(handle.block_ids)
        prefill = worker_pb2_grpc.PrefillStub(channel)
        assert not prefill.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=handle.request_id, transfer_token=bytes(16)), timeout=10).released
        assert prefill.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=handle.request_id, transfer_token=handle.transfer_token), timeout=10).released
        wait_for(
            lambda: (lambda load: load.num_requests_running == 0 and load.num_used_blocks == 0)(worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)),
            "the prefill worker to hold no request and no KV block",
        )
