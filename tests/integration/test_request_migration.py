"""Request migration (issue 13, item 5): a decode worker SIGKILLed mid-stream; the gateway resumes
the request on the other decode worker and the client's stream goes on with no token missing or
repeated: a greedy request ends with exactly the tokens, text, logprobs and usage of an
uninterrupted run."""

from __future__ import annotations

import signal

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

MAX_TOKENS = 96
KILL_AFTER_TOKENS = 8


def busy_decode_workers(gateway) -> list[str]:
    reply = gateway.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
    return [w.registration.worker_id for w in reply.workers if w.registration.role == "decode" and w.num_in_flight > 0]


def request() -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    return gateway_pb2.GenerateRequest(
        text="Write a long story about a lighthouse keeper and the sea.", sampling=sampling, mode=gateway_pb2.SERVING_MODE_AGGREGATED
    )


def summary(chunks):
    tokens = [t for c in chunks for t in c.token_ids]
    logprob_tokens = [lp.token_id for c in chunks for lp in c.logprobs]
    last = chunks[-1]
    return tokens, "".join(c.text for c in chunks), logprob_tokens, last.finish_reason, (last.usage.prompt_tokens, last.usage.completion_tokens)


def test_sigkill_mid_stream_migrates_the_request_with_identical_output(tmp_path, default_model_dir):
    with running_cluster(tmp_path, num_prefill=0, num_decode=2) as cluster, grpc.insecure_channel(cluster.gateway_address) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        wait_for(lambda: len([w for w in gateway.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5).workers if w.registration.role == "decode"]) == 2,
                 "two decode workers in routing", timeout=15)  # fmt: skip
        reference = list(gateway.Generate(request(), timeout=120))
        ref_tokens, ref_text, ref_logprobs, ref_finish, ref_usage = summary(reference)
        assert len(ref_tokens) == MAX_TOKENS and ref_text

        chunks, killed = [], None
        for chunk in gateway.Generate(request(), timeout=120):
            chunks.append(chunk)
            if killed is None and sum(len(c.token_ids) for c in chunks) >= KILL_AFTER_TOKENS:
                busy = wait_for(lambda: busy_decode_workers(gateway), "the request's decode worker")
                assert len(busy) == 1
                killed = cluster.service(busy[0])
                killed.proc.send_signal(signal.SIGKILL)
                killed.proc.wait(timeout=10)
        assert killed is not None
        tokens, text, logprobs, finish, usage = summary(chunks)
        served_after = sum(len(c.token_ids) for c in chunks[KILL_AFTER_TOKENS:])
        assert served_after > 0  # the rest came from the surviving worker
        assert tokens == ref_tokens
        assert text == ref_text
        assert logprobs == ref_logprobs == ref_tokens  # one logprob per token, none repeated
        assert (finish, usage) == (ref_finish, ref_usage)
        assert "migrating it" in cluster.service("gateway").log_tail(200)
