"""Workers that die or drain, and an etcd that goes away: the cluster keeps serving.

One cluster of three decode workers (lease TTL 3 s), used in order: a SIGTERM drain, a SIGKILL,
then etcd outages (frozen by SIGSTOP, SIGKILLed, wiped), each under a steady `tandem bench` load
that must see no failed request. Not supervised: the killed workers stay dead, and etcd is
stopped and started by the tests themselves. (Supervised restarts: test_supervision.py,
test_chaos_under_load.py.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import grpc
import pytest

from benchmarks.bench_load import BenchLoad, failures
from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.registry import decode_registration, make_client, workers_prefix
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

LEASE_TTL = 3


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory, default_model_dir):
    with running_cluster(tmp_path_factory.mktemp("resilience"), num_prefill=0, num_decode=3, restart=False) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(cluster3):
    with grpc.insecure_channel(cluster3.gateway_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def decode_workers(gateway) -> dict[str, int]:
    """worker id → requests the gateway has in flight there, for the decode workers it routes to."""
    reply = gateway.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
    return {w.registration.worker_id: w.num_in_flight for w in reply.workers if w.registration.role == "decode"}


def ask(gateway, max_tokens: int = 4, timeout: float = 60) -> list[common_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(text="Resilience check:", sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return list(gateway.Generate(request, timeout=timeout))


def etcd_keys(endpoint: str, cluster: str) -> set[str]:
    async def read():
        client = make_client(endpoint)
        try:
            got = await client.get_prefix(workers_prefix(cluster).encode())
            return {decode_registration(kv.value).worker_id for kv in got.kvs}
        finally:
            await client.close()

    try:
        return asyncio.run(read())
    except Exception:  # noqa: BLE001 - etcd down: nothing readable
        return set()


def test_sigterm_drains_in_flight_requests_and_revokes_the_lease(cluster3, gateway):
    assert len(wait_for(lambda: len(decode_workers(gateway)) == 3 and decode_workers(gateway), "three decode workers")) == 3
    chunks, errors = [], []

    def long_request():
        try:
            chunks.extend(ask(gateway, max_tokens=160))
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=long_request)
    t.start()
    busy = wait_for(lambda: [w for w, n in decode_workers(gateway).items() if n > 0], "the long request to reach a worker")
    victim = cluster3.service(busy[0])
    victim.proc.send_signal(signal.SIGTERM)
    # the lease is revoked first: the gateway stops routing there while the request still runs
    wait_for(lambda: victim.name not in decode_workers(gateway), f"{victim.name} to leave the gateway's view", timeout=5)
    assert victim.name not in etcd_keys(cluster3.etcd_endpoint, "default")
    assert t.is_alive(), "the request finished before the drain could be observed; make it longer"
    assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH  # served by the others
    t.join(timeout=90)
    assert not errors, errors
    assert sum(len(c.token_ids) for c in chunks) == 160 and chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert victim.proc.wait(timeout=30) == 0


def test_sigkill_worker_disappears_within_the_lease_ttl_and_requests_go_elsewhere(cluster3, gateway):
    alive = sorted(decode_workers(gateway))
    assert len(alive) == 2
    victim = cluster3.service(alive[0])
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # requests sent right away all succeed: a broken worker is skipped or retried elsewhere
    for _ in range(4):
        assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    wait_for(lambda: victim.name not in decode_workers(gateway), f"{victim.name} to leave the gateway's view", timeout=LEASE_TTL + 3)
    assert time.monotonic() - killed_at <= LEASE_TTL + 3
    assert victim.name not in etcd_keys(cluster3.etcd_endpoint, "default")


def etcd_outage_load(cluster, tmp_path) -> BenchLoad:
    """A steady load across an etcd outage: 12 s at 2 requests/s, short prompts and outputs."""
    return BenchLoad(cluster.gateway_address, tmp_path / "bench", duration=12, rate=2, input_len=32, output_len=12)


def test_etcd_killed_for_longer_than_the_lease_ttl_under_load_fails_no_request(cluster3, gateway, tmp_path):
    survivors = set(decode_workers(gateway))
    assert len(survivors) == 1
    etcd = cluster3.etcd
    with etcd_outage_load(cluster3, tmp_path) as load:
        time.sleep(2)
        etcd.proc.kill()
        etcd.proc.wait()
        # nothing in the request path needs etcd: requests keep working while it is down
        for _ in range(3):
            assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        time.sleep(LEASE_TTL + 3)  # past the lease TTL: leases lapse unless etcd kept them
        etcd.start()
        etcd.wait_healthy()
        wait_for(lambda: {"gateway", "tokenizer"} | survivors <= etcd_keys(etcd.endpoint, "default"), "every service registered again", timeout=15)
        result = load.result()
    assert result["completed"] >= 15 and result["failed"] == 0, failures(result)
    assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert set(decode_workers(gateway)) == survivors


def test_etcd_frozen_by_sigstop_under_load_fails_no_request(cluster3, gateway, tmp_path):
    # a frozen etcd accepts connections and never answers: calls to it hang rather than fail fast
    survivors = set(decode_workers(gateway))
    etcd = cluster3.etcd
    with etcd_outage_load(cluster3, tmp_path) as load:
        time.sleep(2)
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(8)
            assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        # leases older than their TTL may lapse as etcd resumes: the services register again
        wait_for(lambda: {"gateway", "tokenizer"} | survivors <= etcd_keys(etcd.endpoint, "default"), "every service registered", timeout=15)
        result = load.result()
    assert result["completed"] >= 15 and result["failed"] == 0, failures(result)
    assert set(decode_workers(gateway)) == survivors


def test_etcd_losing_its_data_is_repaired_by_reregistration(cluster3, gateway):
    # (no load here: the loop below sends requests throughout the repair)
    survivors = set(decode_workers(gateway))
    etcd = cluster3.etcd
    etcd.stop()
    shutil.rmtree(etcd.data_dir)  # a new, empty etcd: every key and lease is gone
    etcd.start()
    etcd.wait_healthy()
    # the gateway resyncs to an empty etcd while the services register again: live workers are
    # kept meanwhile, so every request in that window is served
    deadline = time.monotonic() + 15
    while not {"gateway", "tokenizer"} | survivors <= etcd_keys(etcd.endpoint, "default"):
        assert time.monotonic() < deadline, "the services did not register again"
        assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert set(decode_workers(gateway)) == survivors
    assert ask(gateway)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
