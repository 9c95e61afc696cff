"""Disaggregated serving end to end: prefill and decode workers as processes, KV over UCX.

Output equals aggregated serving token for token; decode pulls only what it lacks; every failure
(layout mismatch, bad or reused token, a dead or frozen prefill worker, a lease nobody uses, a
cancelled client) ends with both workers holding no KV blocks.
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

AGG, DISAGG = gateway_pb2.SERVING_MODE_AGGREGATED, gateway_pb2.SERVING_MODE_DISAGGREGATED
LEASE_S = 3
ROLE_ARGS = {
    "prefill": ["--kv-lease-seconds", str(LEASE_S)],
    "decode": ["--kv-transfer-timeout", "3"],
    "gateway": ["--disagg-min-uncached-tokens", "0"],  # AUTO stays aggregated: tests choose the mode
}


@pytest.fixture(scope="module")
def pd(tmp_path_factory, default_model_dir, otlp_collector):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with running_cluster(tmp_path_factory.mktemp("pd"), role_args=ROLE_ARGS, env=env) as c:
        yield c


def gateway(c) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(c.gateway_address))


def ids(n: int, start: int = 1000) -> list[int]:
    return [start + (i * 7919) % 30000 for i in range(n)]


def generate(c, prompt_ids, mode, max_tokens: int = 12, **sampling) -> list[common_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt_ids), mode=mode,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **sampling),
    )  # fmt: skip
    return list(gateway(c).Generate(request, timeout=120))


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def load(c, name: str) -> worker_pb2.LoadSnapshot:
    with grpc.insecure_channel(c.service(name).address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


def wait_idle(c, *names: str, timeout: float = LEASE_S + 5) -> None:
    """Each worker ends with no request, no KV block held, and its check_integrity() clean."""
    for name in names:
        wait_for(lambda: (lambda s: s.num_used_blocks == 0 and s.num_requests_running == 0 and s.num_requests_waiting == 0)(load(c, name)),
                 f"{name} to hold no request and no KV block", timeout=timeout)  # fmt: skip
        with grpc.insecure_channel(c.service(name).address) as ch:
            check = worker_pb2_grpc.WorkerStub(ch).CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=10)
        assert check.ok, f"{name}: {check.problem}"


def metric(c, name: str, sample: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.service(name).metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == sample and labels.items() <= s.labels.items())


@pytest.mark.parametrize("n", [5, 16, 16 * 7 + 3])  # shorter than a block, one block, many blocks
def test_disaggregated_equals_aggregated(pd, n):
    prompt = ids(n, start=n)
    pulled_before = metric(pd, "decode-0", "tandem_kv_pull_blocks_total")
    local_before = metric(pd, "decode-0", "tandem_kv_pulls_total", path="local")
    disagg = generate(pd, prompt, DISAGG)
    pulled = metric(pd, "decode-0", "tandem_kv_pull_blocks_total") - pulled_before
    # both workers on this host: the decode worker read the blocks from the prefill worker's memory
    assert metric(pd, "decode-0", "tandem_kv_pulls_total", path="local") - local_before == 1
    agg = generate(pd, prompt, AGG)
    assert tokens(disagg) == tokens(agg)
    assert "".join(c.text for c in disagg) == "".join(c.text for c in agg)
    assert len(disagg[0].token_ids) == 1, "the first chunk is the prefill worker's token, streamed at once"
    assert disagg[-1].usage.completion_tokens == 12 and disagg[-1].usage.prompt_tokens == n
    assert pulled == -(-n // 16), "a cold decode worker pulls every block of the prompt"
    wait_idle(pd, "prefill-0", "decode-0")


def test_later_pulls_are_requested_over_the_prefill_worker_s_same_host_channel(pd):
    """The first pull from a prefill worker goes over UCX and brings the key to its channel (a Unix
    socket, kvtransfer/local_channel.py); later ones are requested over that channel."""
    local_before = metric(pd, "decode-0", "tandem_kv_pulls_total", path="local")
    channel_before = metric(pd, "decode-0", "tandem_kv_channel_pulls_total")
    first = generate(pd, ids(40, start=900), DISAGG)
    second = generate(pd, ids(40, start=950), DISAGG)
    assert tokens(first) and tokens(second)
    assert metric(pd, "decode-0", "tandem_kv_pulls_total", path="local") - local_before == 2
    assert metric(pd, "decode-0", "tandem_kv_channel_pulls_total") - channel_before >= 1
    wait_idle(pd, "prefill-0", "decode-0")


def test_decode_pulls_only_the_blocks_it_lacks(pd):
    shared = ids(16 * 4, start=5)
    generate(pd, shared + [11, 12, 13], AGG)  # the decode worker now caches the four shared blocks
    before = metric(pd, "decode-0", "tandem_kv_pull_blocks_total")
    prompt = shared + ids(16 * 2 + 9, start=77)
    chunks = generate(pd, prompt, DISAGG)
    assert metric(pd, "decode-0", "tandem_kv_pull_blocks_total") - before == 3  # two full blocks + the partial one
    assert tokens(chunks) == tokens(generate(pd, prompt, AGG))
    wait_idle(pd, "prefill-0", "decode-0")


def registration(c, worker_id: str) -> common_pb2.WorkerRegistration:
    """A worker's registration as the gateway sees it (its data-plane identity included)."""
    workers = gateway(c).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=10).workers
    return next(w.registration for w in workers if w.registration.worker_id == worker_id)


def prefill_directly(c, prompt, request_id: str, for_decode: str = "decode-0") -> worker_pb2.PrefillResponse:
    """The prefill leg as the gateway calls it: the KV handle is bound to decode worker `for_decode`."""
    decode = registration(c, for_decode)
    with grpc.insecure_channel(c.service("prefill-0").address) as ch:
        return worker_pb2_grpc.PrefillStub(ch).Prefill(
            worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                      sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                      decode_worker_id=decode.worker_id, decode_kv_address=decode.kv_client_address),
            timeout=60,
        )  # fmt: skip


def decode_directly(c, prompt, reply: worker_pb2.PrefillResponse, request_id: str, name: str = "decode-0") -> list[common_pb2.GenerateResponse]:
    with grpc.insecure_channel(c.service(name).address) as ch:
        request = worker_pb2.WorkerGenerateRequest(
            request_id=request_id, prompt_token_ids=prompt, kv_handle=reply.kv_handle, first_token_id=reply.first.token_ids[0],
            sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        )  # fmt: skip
        return list(worker_pb2_grpc.DecodeStub(ch).Generate(request, timeout=60))


def test_layout_mismatch_is_refused_before_any_byte_moves(pd):
    prompt = ids(40, start=3)
    reply = prefill_directly(pd, prompt, "mismatch")
    reply.kv_handle.layout_fingerprint = "0123456789abcdef"
    failures = metric(pd, "decode-0", "tandem_kv_pull_failures_total")
    with pytest.raises(grpc.RpcError) as err:
        decode_directly(pd, prompt, reply, "mismatch")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "layout mismatch" in err.value.details()
    assert metric(pd, "decode-0", "tandem_kv_pull_failures_total") == failures  # no pull was tried
    wait_idle(pd, "decode-0")
    wait_idle(pd, "prefill-0")  # nobody pulled: the lease frees the blocks


def test_wrong_token_is_rejected_and_the_prompt_recomputed(pd):
    prompt = ids(50, start=4)
    expected = tokens(generate(pd, prompt, AGG, max_tokens=8))
    reply = prefill_directly(pd, prompt, "wrong-token")
    reply.kv_handle.transfer_token = bytes(16)
    failures = metric(pd, "decode-0", "tandem_kv_pull_failures_total")
    chunks = decode_directly(pd, prompt, reply, "wrong-token")
    assert [reply.first.token_ids[0]] + tokens(chunks) == expected
    assert metric(pd, "decode-0", "tandem_kv_pull_failures_total") == failures + 1
    wait_idle(pd, "prefill-0", "decode-0")


def test_reused_token_is_rejected(pd):
    prompt = ids(50, start=8)
    reply = prefill_directly(pd, prompt, "reuse")
    first = decode_directly(pd, prompt, reply, "reuse-1")
    failures = metric(pd, "decode-0", "tandem_kv_pull_failures_total")
    second = decode_directly(pd, prompt, reply, "reuse-2")  # recomputed: the token was spent
    assert tokens(first) == tokens(second)
    assert metric(pd, "decode-0", "tandem_kv_pull_failures_total") == failures + 1
    wait_idle(pd, "prefill-0", "decode-0")


def test_unpulled_blocks_are_freed_when_the_lease_expires(pd):
    prefill_directly(pd, ids(64, start=9), "abandoned")
    assert load(pd, "prefill-0").num_used_blocks == 4
    expired = metric(pd, "prefill-0", "tandem_kv_leases_expired_total")
    wait_idle(pd, "prefill-0", timeout=LEASE_S + 5)
    assert metric(pd, "prefill-0", "tandem_kv_leases_expired_total") == expired + 1


def test_cancelled_client_frees_both_sides(pd):
    request = gateway_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=ids(300, start=10)), mode=DISAGG,
        sampling=common_pb2.SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True),
    )  # fmt: skip
    call = gateway(pd).Generate(request, timeout=120)
    next(call)  # the prefill worker's first token
    next(call)  # decode is streaming
    assert load(pd, "decode-0").num_used_blocks > 0
    call.cancel()
    wait_idle(pd, "prefill-0", "decode-0", timeout=5)  # well before the lease would expire


def test_transfer_spans_are_in_the_requests_trace(pd, otlp_collector):
    request = gateway_pb2.GenerateRequest(
        request_id="pd-trace-1", token_ids=common_pb2.TokenIds(ids=ids(40, start=12)), mode=DISAGG,
        sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),  # a sampled EOS would end it before the pull
    )  # fmt: skip
    list(gateway(pd).Generate(request, timeout=60))
    pull = wait_for(lambda: next((s for s in otlp_collector.snapshot() if s.name == "kv.pull" and s.attributes.get("tandem.request_id") == "pd-trace-1"), None),
                    "the decode worker's kv.pull span")  # fmt: skip
    assert pull.attributes["tandem.kv.blocks"] == 3
    wanted = {("tandem-gateway", "/tandem.v1.Prefill/Prefill"), ("tandem-prefill", "/tandem.v1.Prefill/Prefill"),
              ("tandem-gateway", "/tandem.v1.Decode/Generate"), ("tandem-decode", "kv.pull")}  # fmt: skip
    wait_for(lambda: wanted <= {(s.service, s.name) for s in otlp_collector.spans_of_trace(pull.trace_id)}, "prefill, decode and transfer spans in one trace")


# ---- dying and frozen peers (each in a cluster of its own) ---------------------------------------


def test_frozen_then_killed_prefill_worker_leaves_decode_serving(tmp_path, default_model_dir):
    with running_cluster(tmp_path, role_args=ROLE_ARGS) as c:
        prompt = ids(16 * 40, start=21)
        expected = tokens(generate(c, prompt, AGG, max_tokens=6))
        prefill = c.service("prefill-0").proc
        reply = prefill_directly(c, prompt, "frozen")
        os.kill(prefill.pid, signal.SIGSTOP)  # the pull starts against a peer that never answers
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(chunks=decode_directly(c, prompt, reply, "frozen")))
        t.start()
        try:
            t.join(timeout=1.0)
            os.kill(prefill.pid, signal.SIGKILL)  # ... and then dies mid-transfer
        finally:
            t.join(timeout=60)
        assert [reply.first.token_ids[0]] + tokens(result["chunks"])[:5] == expected[:6]
        assert c.service("decode-0").proc.poll() is None, "the decode worker must survive"
        assert tokens(generate(c, prompt, AGG, max_tokens=6)) == expected  # and keep serving
        wait_idle(c, "decode-0")


def test_killed_decode_worker_leaves_prefill_serving(tmp_path, default_model_dir):
    with running_cluster(tmp_path, role_args=ROLE_ARGS) as c:
        prompt = ids(16 * 60, start=31)
        decode = c.service("decode-0").proc
        errors: list[grpc.RpcError] = []

        def request():
            try:
                generate(c, prompt, DISAGG, max_tokens=200)
            except grpc.RpcError as e:
                errors.append(e)

        t = threading.Thread(target=request)
        t.start()
        # kill the decode worker while the prompt's blocks are pinned for it (pulling, or about to)
        wait_for(lambda: load(c, "prefill-0").num_used_blocks > 0, "the prefill to hold the prompt's blocks", timeout=30, interval=0.005)
        decode.send_signal(signal.SIGKILL)
        t.join(timeout=60)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
        assert c.service("prefill-0").proc.poll() is None, "the prefill worker must survive"
        reply = prefill_directly(c, ids(40, start=41), "after")  # and keep serving
        assert reply.kv_handle.transfer_token
        wait_idle(c, "prefill-0")  # the dead decode's blocks are released or expire


def test_disaggregated_equals_aggregated_on_a_tiny_model(tmp_path, tiny_llama):
    # a second architecture and layout (tiny random Llama: 2 layers, block size 16), token ids in
    with running_cluster(tmp_path, model=str(tiny_llama), tokenizer=False, role_args=ROLE_ARGS) as c:
        for n in (5, 16, 16 * 6 + 1):
            prompt = [3 + (i * 37) % 380 for i in range(n)]
            disagg, agg = generate(c, prompt, DISAGG), generate(c, prompt, AGG)
            assert tokens(disagg) == tokens(agg) and len(tokens(agg)) == 12, n
        wait_idle(c, "prefill-0", "decode-0")


def test_policy_fail_turns_a_failed_pull_into_unavailable(tmp_path, default_model_dir):
    role_args = {**ROLE_ARGS, "decode": ["--kv-transfer-timeout", "3", "--kv-transfer-policy", "fail"]}
    with running_cluster(tmp_path, role_args=role_args, num_prefill=1, num_decode=1) as c:
        prompt = ids(50, start=51)
        reply = prefill_directly(c, prompt, "policy-fail")
        reply.kv_handle.transfer_token = bytes(16)
        with pytest.raises(grpc.RpcError) as err:
            decode_directly(c, prompt, reply, "policy-fail")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "KV transfer" in err.value.details()
        wait_idle(c, "decode-0", "prefill-0")  # the request's blocks on decode, the lease on prefill
