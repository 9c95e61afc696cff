"""The OpenAI HTTP API at its edges, with the `openai` SDK: API keys on both front doors, the
gateway's in-flight limit (429), no worker (503), and a SIGTERM that drains a running stream.

A tiny random Llama serves here (token-id prompts; no tokenizer service), so the cluster starts in
seconds; its gateway requires keys and serves one request at a time.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

KEYS = ("key-one", "key-two")
PROMPT = [5, 17, 99, 3, 250, 42, 7, 8]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_llama):
    # token-id prompts only (no tokenizer service), so /health needs a decode worker alone
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text("\n".join(KEYS) + "\n")
    gateway_args = ["--api-keys", f"@{key_file}", "--max-requests-in-flight", "1", "--health-requires-tokenizer", "0", "--http-max-body-bytes", str(1 << 20)]
    with running_cluster(tmp_path_factory.mktemp("guarded"), model=str(tiny_llama), tokenizer=False, num_prefill=0, role_args={"gateway": gateway_args}) as c:
        yield c


def sdk(cluster, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway_http_url, api_key=key, max_retries=0, timeout=60)


def post_without_key(cluster, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(cluster.gateway_http_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_requires_one_of_the_keys(guarded, tiny_llama):
    model = str(tiny_llama)
    status, body = post_without_key(guarded, "/completions", {"model": model, "prompt": PROMPT})
    assert status == 401 and body["error"]["code"] == "missing_api_key" and "Authorization: Bearer" in body["error"]["message"]
    with sdk(guarded, "wrong") as client:
        with pytest.raises(openai.AuthenticationError) as err:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with sdk(guarded, KEYS[1]) as client:
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3 and reply.model == model
        assert [m.id for m in client.models.list().data] == [model]
    # operators' endpoints stay open, as in vLLM
    root = guarded.gateway_http_url.removesuffix("/v1")
    for path in ("/health", "/metrics"):
        with urllib.request.urlopen(root + path, timeout=10) as r:
            assert r.status == 200


def test_grpc_requires_the_same_keys(guarded):
    request = gateway_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=PROMPT), sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    )
    with grpc.insecure_channel(guarded.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=30, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        chunks = list(stub.Generate(request, timeout=30, metadata=(("authorization", f"Bearer {KEYS[0]}"),)))
        assert chunks[-1].usage.completion_tokens == 2


def test_tandem_bench_sends_the_key_over_grpc(guarded, tmp_path):
    from loadtest.bench_cli import main as bench

    out = tmp_path / "keyed"
    args = ["random", "--gateway", guarded.gateway_address, "--vocab-size", "384", "--input-len", "8", "--output-len", "2", "--num-prompts", "2",
            "--max-concurrency", "1", "--api-key", KEYS[0], "--out", str(out), "--no-progress", "--no-plots"]  # fmt: skip
    assert bench(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["completed"] == 2 and "describe_error" not in result["target"]


def test_beyond_the_in_flight_limit_is_429_with_retry_after(guarded, tiny_llama):
    with sdk(guarded, KEYS[0]) as client:
        busy = client.completions.create(model=str(tiny_llama), prompt=PROMPT, max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True})
        try:
            next(iter(busy))  # the one request the gateway admits is running
            with pytest.raises(openai.RateLimitError) as err:
                client.completions.create(model=str(tiny_llama), prompt=PROMPT, max_tokens=2)
            assert err.value.status_code == 429 and err.value.response.headers["Retry-After"] == "1"
            assert "max_requests_in_flight" in err.value.body["message"]
        finally:
            busy.close()


def raw_get(cluster, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(cluster.gateway_http_url.removesuffix("/v1") + path, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_body_over_the_limit_is_413_naming_the_setting(guarded, tiny_llama):
    body = json.dumps({"model": str(tiny_llama), "prompt": "x" * (1 << 20), "max_tokens": 1}).encode()
    request = urllib.request.Request(guarded.gateway_http_url + "/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    error = json.loads(err.value.read())["error"]
    assert err.value.code == 413 and "http_max_body_bytes" in error["message"] and str(1 << 20) in error["message"]


def test_no_decode_worker_is_503_with_retry_after(tmp_path):
    with running_cluster(tmp_path, tokenizer=False, num_prefill=0, num_decode=0) as c, sdk(c, "no-keys-needed") as client:
        # readiness: nothing could be served, so 503 saying why; liveness: the process answers
        status, body = raw_get(c, "/health")
        assert status == 503 and "no decode worker is ready" in json.loads(body)["error"]["message"]
        assert raw_get(c, "/livez")[0] == 200 and raw_get(c, "/health/live")[0] == 200
        assert client.models.list().data == []
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as err:
                client.completions.create(model="any", prompt=PROMPT, max_tokens=2, stream=stream)
            assert err.value.status_code == 503 and err.value.response.headers["Retry-After"] == "1"
            assert "no decode workers" in err.value.body["message"] and err.value.body["code"] == "unavailable"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("any")


def test_sigterm_lets_a_running_stream_finish_then_refuses_connections(guarded, tiny_llama):
    """Runs last in this module: it stops the gateway."""
    with sdk(guarded, KEYS[0]) as client:
        stream = client.completions.create(model=str(tiny_llama), prompt=PROMPT, max_tokens=800, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
        events = iter(stream)
        next(events)
        with grpc.insecure_channel(guarded.service("decode-0").address) as ch:
            load = worker_pb2_grpc.WorkerStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        assert load.num_requests_running == 1, "the stream is still being generated when the gateway is told to stop"
        guarded.service("gateway").proc.send_signal(signal.SIGTERM)
        rest = list(events)
        assert rest[-1].usage.completion_tokens == 800, "the in-flight stream was drained to its end"
        assert rest[-2].choices[0].finish_reason == "length"
        assert guarded.service("gateway").proc.wait(timeout=30) == 0
        time.sleep(0.2)
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model=str(tiny_llama), prompt=PROMPT, max_tokens=2)
