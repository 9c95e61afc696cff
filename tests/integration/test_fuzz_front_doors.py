"""Generated bad input at both front doors of a real cluster (tests/helpers/front_door_fuzz.py):
every answer is a success or a client error (HTTP 4xx; a gRPC status other than UNKNOWN and
INTERNAL), nothing hangs, no process dies, and afterwards every worker's invariants hold and a
normal request gets the same answer as before."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.front_door_fuzz import FrontDoorFuzz
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow

NUM_REQUESTS = 300  # both doors together; benchmarks/fuzz_front_doors.py sends 10,000+
WORKERS = ("prefill-0", "decode-0")


def greedy_answer(channel) -> list[int]:
    request = gateway_pb2.GenerateRequest(text="The capital of France is", sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0))
    return [t for chunk in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=60) for t in chunk.token_ids]


def idle_and_sound(cluster, name: str) -> None:
    with grpc.insecure_channel(cluster.service(name).address) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        wait_for(lambda: stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5).num_requests_running == 0, f"{name} to finish its requests", timeout=60)
        check = stub.CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=10)
    assert check.ok, f"{name}: {check.problem}"


@pytest.mark.parametrize("seed", [1])
def test_generated_bad_requests_get_client_errors_and_break_nothing(cluster, gateway_channel, seed):
    before = greedy_answer(gateway_channel)
    procs = {s.name: s.proc for s in cluster.services}

    fuzz = FrontDoorFuzz(cluster.gateway_http_url, cluster.gateway_address, seed=seed, concurrency=8, timeout=120)
    result = asyncio.run(fuzz.run(NUM_REQUESTS))

    assert sum(result.outcomes.values()) == NUM_REQUESTS
    assert not result.bad, f"{result.num_bad} bad outcomes, e.g. {result.bad[:5]}; all: {dict(result.outcomes)}"
    assert any(k.startswith("http 4") for k in result.outcomes) and any(k == "grpc INVALID_ARGUMENT" for k in result.outcomes)
    for s in cluster.services:
        assert s.proc is procs[s.name] and s.proc.poll() is None, f"{s.name} died (or was restarted) under bad input"
    for name in WORKERS:
        idle_and_sound(cluster, name)
    assert greedy_answer(gateway_channel) == before
