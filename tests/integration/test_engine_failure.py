"""A worker whose engine thread dies stops taking traffic at once (issue 13, item 3).

Two decode workers of a tiny model; decode-1 is restarted with the fault-injection hook
(services/engine/fault_injection.py) armed, so its engine thread fails after a few steps of a
long request sent to it directly. It must end that request with UNAVAILABLE, leave the
gateway's routing within a second, answer UNAVAILABLE (not hang) to CheckIntegrity, exit with a
non-zero code, and every later request through the gateway must succeed on decode-0.
"""

from __future__ import annotations

import time

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.engine.fault_injection import ENV_AFTER_STEPS
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

FAULT_AFTER_STEPS = 30


def routed_decode_workers(gateway) -> set[str]:
    reply = gateway.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
    return {w.registration.worker_id for w in reply.workers if w.registration.role == "decode"}


def test_engine_failure_leaves_routing_at_once_and_the_other_worker_serves(tmp_path, tiny_llama):
    with running_cluster(tmp_path, model=str(tiny_llama), tokenizer=False, num_prefill=0, num_decode=2) as cluster:
        victim = cluster.service("decode-1")
        victim.proc.terminate()  # restart it with the fault armed (only this process gets the variable)
        assert victim.proc.wait(timeout=30) == 0
        victim.env[ENV_AFTER_STEPS] = str(FAULT_AFTER_STEPS)
        victim.start()
        cluster.wait_serving(victim, time.monotonic() + 60)
        with grpc.insecure_channel(cluster.gateway_address) as gw_channel, grpc.insecure_channel(victim.address) as channel:
            gateway = gateway_pb2_grpc.GatewayStub(gw_channel)
            wait_for(lambda: routed_decode_workers(gateway) == {"decode-0", "decode-1"}, "both decode workers in routing", timeout=15)

            # a long request straight to the victim: its engine fails mid-stream
            request = worker_pb2.WorkerGenerateRequest(
                request_id="doomed", prompt_token_ids=list(range(3, 19)), sampling=common_pb2.SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
            )
            chunks = []
            with pytest.raises(grpc.RpcError) as failed:
                for chunk in worker_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60):
                    chunks.append(chunk)
            failed_at = time.monotonic()
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
            assert "retry on another worker" in failed.value.details()
            assert 0 < sum(len(c.token_ids) for c in chunks) < 600

            # it leaves routing within one second of the failure (its lease is revoked)
            wait_for(lambda: "decode-1" not in routed_decode_workers(gateway), "decode-1 to leave the gateway's routing", timeout=3, interval=0.02)
            assert time.monotonic() - failed_at <= 1.0

            # CheckIntegrity answers at once (UNAVAILABLE), whether the process is still draining or gone
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as checked:
                worker_pb2_grpc.WorkerStub(channel).CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=10)
            assert checked.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 5

            # it exits non-zero, so a supervisor restarts it
            assert victim.proc.wait(timeout=30) != 0

            # later requests all succeed, on the other worker
            for i in range(6):
                ask = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=list(range(5, 25 + i))),
                                                  sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # fmt: skip
                answer = list(gateway.Generate(ask, timeout=30))
                assert answer[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and answer[-1].usage.completion_tokens == 8
            assert routed_decode_workers(gateway) == {"decode-0"}
            log = victim.log_path.read_text(errors="replace")
            assert "InjectedEngineFault" in log and "exiting with code 1" in log
