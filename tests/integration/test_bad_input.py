"""Bad requests get the right status and a message naming what to fix; cancelled streams free KV."""

from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow


def status_of(channel, request: gateway_pb2.GenerateRequest, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout))
    return err.value.code(), err.value.details()


def chat(*messages: tuple[str, str]) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages])


BAD_REQUESTS = [
    (gateway_pb2.GenerateRequest(), "prompt"),
    (gateway_pb2.GenerateRequest(text=""), "text"),
    (gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds()), "token_ids"),
    (gateway_pb2.GenerateRequest(chat=chat()), "chat.messages"),
    (gateway_pb2.GenerateRequest(chat=chat(("robot", "hi"))), "chat.messages[0].role"),
    (gateway_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(temperature=-1)), "sampling.temperature"),
    (gateway_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (gateway_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(top_k=0)), "sampling.top_k"),
    (gateway_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    (gateway_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(stop=[""])), "sampling.stop[0]"),
    (gateway_pb2.GenerateRequest(text="hi", model="no-such-model"), "model"),
    (gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[1, 10**7])), "prompt_token_ids[1]"),
    (gateway_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=10**6)), "sampling.max_tokens"),
]


@pytest.mark.parametrize("request_, field", BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(gateway_channel, request_, field):
    code, details = status_of(gateway_channel, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert field in details, details


def test_too_long_prompt_says_how_long_it_may_be(gateway_channel):
    long_prompt = common_pb2.TokenIds(ids=[42] * 9000)  # SmolLM2's context is 8192
    code, details = status_of(gateway_channel, gateway_pb2.GenerateRequest(token_ids=long_prompt))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "9000 tokens" in details and "8192" in details


def test_expired_deadline_is_deadline_exceeded(gateway_channel):
    request = gateway_pb2.GenerateRequest(text="Write a long story.", sampling=common_pb2.SamplingParams(max_tokens=500, ignore_eos=True))
    code, _ = status_of(gateway_channel, request, timeout=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancelled_stream_frees_the_workers_kv_blocks(cluster, gateway_channel):
    decode = grpc.insecure_channel(cluster.service("decode-0").address)
    worker = worker_pb2_grpc.WorkerStub(decode)

    def load():
        return worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)

    wait_for(lambda: load().num_used_blocks == 0, "an idle decode worker")
    request = gateway_pb2.GenerateRequest(
        text="Tell me everything about the history of Rome. " * 8, sampling=common_pb2.SamplingParams(max_tokens=1000, ignore_eos=True)
    )
    call = gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(request, timeout=120)
    next(call)  # the first chunk: the worker holds the prompt's blocks now
    busy = load()
    assert busy.num_requests_running == 1 and busy.num_used_blocks > 0
    call.cancel()
    idle = wait_for(
        lambda: (lambda s: s if s.num_requests_running == 0 and s.num_used_blocks == 0 else None)(load()),
        "the cancelled request to leave the decode worker",
        timeout=10,
    )
    assert idle.num_requests_running == 0
    decode.close()


def test_no_workers_is_unavailable_saying_so(tmp_path, default_model_dir):
    with running_cluster(tmp_path, num_prefill=0, num_decode=0) as c, grpc.insecure_channel(c.gateway_address) as channel:
        code, details = status_of(channel, gateway_pb2.GenerateRequest(text="hello"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no decode workers" in details and "tandem serve decode" in details


def test_undecodable_bytes_are_invalid_argument_at_every_service(cluster):
    for name, method in (("gateway", "/tandem.v1.Gateway/Generate"), ("decode-0", "/tandem.v1.Decode/Generate"), ("prefill-0", "/tandem.v1.Prefill/Prefill"),
                         ("tokenizer", "/tandem.v1.Tokenizer/Tokenize")):  # fmt: skip
        with grpc.insecure_channel(cluster.service(name).address) as channel:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                list(call(b"\xff\xff\xff\xff\x0f", timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        assert "is not a valid tandem.v1." in err.value.details()


def worker_request(**sampling) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id="direct", prompt_token_ids=[1, 9906, 28, 2], sampling=common_pb2.SamplingParams(max_tokens=2, **sampling)
    )


@pytest.mark.parametrize(
    "sampling, field",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e30}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"logprobs": 1000}, "logprobs"),
        ({"stop": ["x"] * 100}, "stop"),
        ({"stop_token_ids": list(range(5000))}, "stop_token_ids"),
    ],
)
def test_a_worker_called_directly_checks_the_sampling_values(cluster, sampling, field):
    with grpc.insecure_channel(cluster.service("decode-0").address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(worker_pb2_grpc.DecodeStub(channel).Generate(worker_request(**sampling), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), err.value.details()


def test_a_tiny_temperature_is_greedy_not_a_dead_engine(gateway_channel):
    def tokens(temperature: float) -> list[int]:
        request = gateway_pb2.GenerateRequest(
            text="Once upon a time", sampling=common_pb2.SamplingParams(max_tokens=5, temperature=temperature, ignore_eos=True)
        )
        return [t for c in gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(request, timeout=60) for t in c.token_ids]

    assert tokens(1e-30) == tokens(1e-7) == tokens(0.0)


def test_http_bodies_python_would_misread_are_400(cluster):
    import json
    import urllib.error
    import urllib.request

    url = cluster.gateway_http_url + "/completions"
    for body, param in ((b'{"prompt": "hi \\ud800", "max_tokens": 1}', "prompt"), (b'{"prompt": "hi", "temperature": NaN}', None),
                        (b'{"prompt": "hi", "temperature": 1e400}', None), (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None)):  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}), timeout=30)
        error = json.loads(err.value.read())["error"]
        assert err.value.code == 400 and error["param"] == param, error
