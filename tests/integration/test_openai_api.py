"""The gateway's OpenAI-compatible HTTP API, driven by the official `openai` SDK against real processes.

The same answers as gRPC Generate (one request path), streaming as OpenAI shapes it, stop strings,
usage with cached prompt tokens, logprobs, errors with the right status naming the field, and a
client that goes away: every leg is cancelled and the workers' KV pools are whole again.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow

MODEL = "default"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    with openai.OpenAI(base_url=cluster.gateway_http_url, api_key="not-needed", max_retries=0, timeout=120) as c:
        yield c


def grpc_generate(cluster, **fields) -> list[common_pb2.GenerateResponse]:
    with grpc.insecure_channel(cluster.gateway_address) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(**fields), timeout=120))


def raw(cluster, path: str, body=None, method: str | None = None) -> tuple[int, dict | str, dict]:
    """(status, JSON body or text, headers) of one plain HTTP request."""
    url = cluster.gateway_http_url.removesuffix("/v1") + path
    data = body.encode() if isinstance(body, str) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, text, headers = r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, text, headers = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


# ---- generation ---------------------------------------------------------------------------------


def test_completion_equals_grpc_generate_token_for_token(cluster, client):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = grpc_generate(cluster, text=prompt, sampling=common_pb2.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    (choice,) = reply.choices
    assert choice.text == "".join(c.text for c in chunks)
    assert choice.token_ids == [t for c in chunks for t in c.token_ids]
    assert choice.finish_reason == "length" and choice.index == 0
    assert reply.object == "text_completion" and reply.model == MODEL and reply.id.startswith("cmpl-")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (chunks[-1].usage.prompt_tokens, 12)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_completion_has_openais_shape_and_the_same_text(client):
    kwargs = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    events = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *token_events, usage_event = events
    assert len(token_events) > 1, "the answer must be streamed, not sent in one piece"
    assert "".join(e.choices[0].text for e in token_events) == whole
    assert [e.choices[0].finish_reason for e in token_events] == [None] * (len(token_events) - 1) + ["length"]
    assert all(e.usage is None for e in token_events)
    assert usage_event.choices == [] and usage_event.usage.completion_tokens == 16
    assert len({e.id for e in events}) == 1 and all(e.object == "text_completion" for e in events)


def test_token_id_prompts_and_several_prompts(client, offline_llm):
    ids = offline_llm.engine.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(model=MODEL, prompt=["Once upon a time", "The capital of France is"], max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.usage.prompt_tokens == len(ids) + len(offline_llm.engine.tokenizer.encode("The capital of France is"))
    streamed = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0, stream=True)
    texts = {0: "", 1: ""}
    for event in streamed:
        texts[event.choices[0].index] += event.choices[0].text
    assert texts == {0: by_ids.choices[0].text, 1: by_ids.choices[0].text}


def test_chat_through_the_template_streamed_and_not(client, offline_llm):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    message = reply.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
    templated = offline_llm.engine.tokenizer.apply_chat_template(QUESTION)
    assert reply.usage.prompt_tokens == len(offline_llm.engine.tokenizer.encode(templated, add_special_tokens=False))
    events = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0, stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == message.content
    assert events[-1].choices[0].finish_reason == "stop" and all(e.object == "chat.completion.chunk" for e in events)


def test_stop_string_ends_the_text_before_it(client, offline_llm):
    from services.engine import SamplingParams

    prompt = "Count: 1, 2, 3, 4, 5,"
    free = offline_llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].text
    assert " 8" in free, f"the reference continuation changed: {free!r}"
    for stream in (False, True):
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[" 8", "never"], stream=stream,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        events = list(reply) if stream else [reply]
        assert "".join(e.choices[0].text for e in events) == free[: free.index(" 8")]
        assert events[-1].choices[0].finish_reason == "stop" and events[-1].choices[0].stop_reason == " 8"


def test_usage_reports_cached_prompt_tokens_on_a_repeated_prefix(client):
    prompt = f"Cache check {uuid.uuid4().hex}. " + " ".join(f"item{i}" for i in range(60))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}).usage
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    second = list(stream)[-1].usage
    assert first.prompt_tokens == second.prompt_tokens > 48 and first.completion_tokens == second.completion_tokens == 4
    assert first.prompt_tokens_details.cached_tokens == 0
    # every full KV block of the prompt is reused (the last token is always computed)
    assert second.prompt_tokens_details.cached_tokens >= (second.prompt_tokens - 1) // 16 * 16 > 0


def test_logprobs_name_the_tokens_and_equal_grpcs(cluster, client):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text and len(lp.tokens) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) >= 3 and top[tok] == pytest.approx(p) for top, tok, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    chunks = grpc_generate(cluster, text=prompt, sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))
    assert lp.token_logprobs == pytest.approx([e.logprob for c in chunks for e in c.logprobs], abs=1e-5)
    streamed = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, stream=True, extra_body={"ignore_eos": True})
    )
    assert [t for e in streamed for t in e.choices[0].logprobs.tokens] == lp.tokens
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and bytes(c.bytes).decode() == c.token for c in content)


# ---- errors -------------------------------------------------------------------------------------

BAD = [
    (dict(prompt="hi", n=2), "n"),
    (dict(prompt="hi", echo=True), "echo"),
    (dict(prompt="hi", temperature=-1), "temperature"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=10**6), "max_tokens"),
    (dict(prompt="hi", stop=["ok", ""]), "stop[1]"),
    (dict(prompt="hi", logprobs=30), "logprobs"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[1, 10**7]), "prompt[1]"),
    (dict(prompt="hi", presence_penalty=1.0), "presence_penalty"),
    (dict(prompt="hi", stream_options={"include_usage": True}), "stream_options"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[p for _, p in BAD])
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, **fields)
    error = err.value.body
    assert err.value.status_code == 400 and error["param"] == param and param in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_fields_are_400_even_when_streaming(client, stream):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}], stream=stream)
    assert err.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_logprobs=2, stream=stream)
    assert err.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", [[42] * 9000, [[5, 6, 7], [42] * 9000]], ids=["one", "second-of-two"])  # SmolLM2's context is 8192
def test_a_prompt_over_the_context_is_400_context_length_exceeded(cluster, client, stream, prompt):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, stream=stream, max_tokens=500, extra_body={"ignore_eos": True})
    assert err.value.body["code"] == "context_length_exceeded" and "9000 tokens" in err.value.body["message"]
    wait_whole(cluster, "decode-0")  # a good prompt beside the bad one was cancelled, not left running


def test_an_unknown_model_is_404_model_not_found(client):
    for call in (lambda: client.completions.create(model="no-such-model", prompt="hi"),
                 lambda: client.chat.completions.create(model="no-such-model", messages=QUESTION, stream=True),
                 lambda: client.models.retrieve("no-such-model")):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_models_health_metrics_and_malformed_requests(cluster, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "tandem" and models[0].max_model_len == 8192
    assert client.models.retrieve(MODEL).id == MODEL
    assert raw(cluster, "/health")[0] == 200
    status, body, _ = raw(cluster, "/v1/completions", "{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert raw(cluster, "/v1/no-such-route")[0] == 404
    assert raw(cluster, "/v1/completions", method="GET")[0] == 405
    before = metrics(cluster)
    client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=1)
    after = metrics(cluster)
    assert after[("tandem_requests_total", "OK")] - before.get(("tandem_requests_total", "OK"), 0) == 2  # one per prompt, as on gRPC
    http = ("tandem_http_requests_total", "/v1/completions 200")
    assert after[http] - before.get(http, 0) == 1


def metrics(cluster) -> dict[tuple[str, str], float]:
    """(sample, its code label or "route status") → value summed over the other labels, from the HTTP API's /metrics."""
    status, text, _ = raw(cluster, "/metrics")
    assert status == 200
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("code") or f"{s.labels.get('route', '')} {s.labels.get('status', '')}")
            out[key] = out.get(key, 0.0) + s.value
    return out


# ---- cancellation -------------------------------------------------------------------------------


def load(cluster, name: str) -> worker_pb2.LoadSnapshot:
    with grpc.insecure_channel(cluster.service(name).address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


def wait_whole(cluster, *names: str, timeout: float = 15) -> None:
    """Each worker holds no request and no KV block, and its pool passes check_integrity()."""
    for name in names:
        wait_for(lambda: (lambda s: s.num_used_blocks == 0 and s.num_requests_running == 0 and s.num_requests_waiting == 0)(load(cluster, name)),
                 f"{name} to hold no request and no KV block", timeout=timeout)  # fmt: skip
        with grpc.insecure_channel(cluster.service(name).address) as ch:
            check = worker_pb2_grpc.WorkerStub(ch).CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=10)
        assert check.ok, f"{name}: {check.problem}"


# a long prompt is prefilled on the prefill worker (tandem up's 512-token threshold), a short one on decode
@pytest.mark.parametrize("prompt_len", [24, 700], ids=["aggregated", "disaggregated"])
def test_closing_a_stream_early_cancels_every_leg_and_frees_the_kv(cluster, client, prompt_len):
    wait_whole(cluster, "decode-0", "prefill-0")
    before = metrics(cluster).get(("tandem_requests_total", "CANCELLED"), 0)
    prompt = [1000 + (i * 7919 + prompt_len) % 30000 for i in range(prompt_len)]
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    events = iter(stream)
    next(events), next(events)  # two tokens in: the request holds KV blocks on its workers now
    assert load(cluster, "decode-0").num_used_blocks > 0
    stream.close()
    wait_whole(cluster, "decode-0", "prefill-0")
    wait_for(lambda: metrics(cluster).get(("tandem_requests_total", "CANCELLED"), 0) == before + 1, "the gateway to count the request as cancelled")


def test_a_client_that_times_out_cancels_a_non_streamed_request(cluster):
    wait_whole(cluster, "decode-0")
    with openai.OpenAI(base_url=cluster.gateway_http_url, api_key="x", max_retries=0, timeout=2.0) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="Tell me everything about Rome.", max_tokens=2000, temperature=0, extra_body={"ignore_eos": True})
    wait_whole(cluster, "decode-0")
