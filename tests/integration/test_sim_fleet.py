"""Simulated workers against the real gateway and a real etcd: they register like workers, stream
KV events the gateway's prefix index uses, serve aggregated and disaggregated requests end to end,
restart with a new identity, and a fleet of 200 comes and goes without leaving a key behind."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid

import grpc
import pytest

from kvtransfer.block_hash import hash_blocks
from loadtest.sim.fleet import SimFleet
from loadtest.sim.timing import TimingModel
from protos.tandem.v1 import common_pb2, gateway_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.sim_cluster import BS, FAST, InProcessGateway, check_all, keys, tokens
from tests.helpers.waiting import eventually


@pytest.fixture
def cluster_name() -> str:
    return f"sim-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def sim_cluster(etcd, cluster_name):
    """2 decode + 1 prefill simulated workers and an in-process gateway that sees all three."""
    fleet = SimFleet(etcd, cluster_name, num_decode=2, num_prefill=1, timing=FAST, lease_ttl=3)
    await fleet.start()
    gateway = InProcessGateway(etcd, cluster_name)
    try:
        await gateway.start()
        await eventually(lambda: gateway.connected(3), "the gateway to connect to the 3 simulated workers")
        yield fleet, gateway
    finally:
        await gateway.stop()
        await fleet.stop()


async def test_registrations_describe_the_simulated_workers(etcd, cluster_name):
    async with SimFleet(etcd, cluster_name, num_decode=1, num_prefill=1, timing=FAST, num_kv_blocks=500, model="sim-model") as fleet:
        regs = await keys(etcd, cluster_name)
        assert set(regs) == {w.key for w in fleet.workers}
        for w in fleet.workers:
            reg = regs[w.key]
            assert (reg.worker_id, reg.role, reg.grpc_address, reg.ucx_address) == (w.worker_id, w.role, w.address, w.address.encode())
            assert reg.kv_client_address == (w.address.encode() if w.role == "decode" else b"")  # what prefill binds handles to
            assert (reg.model, reg.kv_layout.model_id, reg.block_size, reg.num_kv_blocks) == ("sim-model", "sim-model", BS, 500)
            assert reg.kv_layout.fingerprint == w.layout.fingerprint and reg.max_num_seqs == FAST.max_num_seqs and reg.max_model_len == 8192
            assert abs(reg.started_unix_ms - time.time() * 1000) < 60_000


async def test_prefix_aware_gateway_hits_the_simulated_prefix_cache(sim_cluster):
    fleet, gateway = sim_cluster
    shared = [2000 + (i * 31) % 20000 for i in range(8 * BS)]
    first = await gateway.generate(shared + list(range(30000, 30020)), max_tokens=4)
    assert len(tokens(first)) == 4 and first[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert first[-1].usage.prompt_tokens == 8 * BS + 20 and first[-1].usage.cached_prompt_tokens == 0
    await eventually(lambda: _max_indexed(gateway), "the gateway to index the prompt's blocks")
    for i in range(4):
        again = await gateway.generate(shared + list(range(31000 + 100 * i, 31020 + 100 * i)), max_tokens=3)
        assert again[-1].usage.cached_prompt_tokens == 8 * BS, f"request {i} missed the cached prefix"
    # what the gateway's index says each worker holds is what each worker's cache holds
    held = {w.worker_id: w.cache.num_cached_blocks for w in fleet.workers}
    await eventually(lambda: _indexed_equals(gateway, held), f"ListWorkers num_indexed_blocks to equal the workers' held blocks {held}")
    assert sorted(held[w.worker_id] for w in fleet.decode)[0] == 0, "the cold decode worker was never used"
    await check_all(fleet)


async def _max_indexed(gateway) -> bool:
    return max((await gateway.indexed()).values()) >= 8


async def _indexed_equals(gateway, held: dict[str, int]) -> bool:
    return await gateway.indexed() == held


async def test_disaggregated_requests_run_end_to_end(sim_cluster):
    fleet, gateway = sim_cluster
    (prefill,) = fleet.prefill
    ids = list(range(5000, 5000 + 10 * BS + 7))
    chunks = await gateway.generate(ids, max_tokens=6, mode=gateway_pb2.SERVING_MODE_DISAGGREGATED)
    assert len(tokens(chunks)) == 6 and chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 6
    assert [c.HasField("usage") for c in chunks].count(True) == 1, "usage comes once, at the end (not with the prefill's first token)"
    assert prefill.leases.num_granted == 1 and prefill.leases.num_released == 1, "the decode worker's pull spent the token"
    decoder = next(w for w in fleet.decode if w.engine.num_steps)
    assert set(hash_blocks(ids, BS, "default")) <= decoder.cache.held_hashes(), "the pulled blocks are the decode worker's prefix cache now"
    await eventually(lambda: len(prefill.leases) == 0 and not prefill.engine.pinned and prefill.engine.stats().num_used_blocks == 0,
                "the prefill worker to free the handed-over blocks")  # fmt: skip

    again = await gateway.generate(ids, max_tokens=3, mode=gateway_pb2.SERVING_MODE_DISAGGREGATED)
    assert again[-1].usage.cached_prompt_tokens == 10 * BS, "the prefill worker's own prefix cache served the prompt"
    assert len(tokens(again)) == 3
    await eventually(lambda: len(prefill.leases) == 0 and prefill.engine.stats().num_used_blocks == 0, "the second handle to be released")
    await check_all(fleet)
    assert fleet.check_integrity() == {}
    held = {w.worker_id: w.cache.num_cached_blocks for w in fleet.workers}
    await eventually(lambda: _indexed_equals(gateway, held), f"the gateway's index to match the held blocks {held}")


async def test_bad_requests_get_the_real_workers_status_codes(sim_cluster):
    fleet, _ = sim_cluster
    decoder, prefill = fleet.decode[0], fleet.prefill[0]
    async with grpc.aio.insecure_channel(decoder.address) as ch, grpc.aio.insecure_channel(prefill.address) as pch:
        decode_stub, prefill_stub = worker_pb2_grpc.DecodeStub(ch), worker_pb2_grpc.PrefillStub(pch)
        cases = [
            (worker_pb2.WorkerGenerateRequest(request_id="e1"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
            (worker_pb2.WorkerGenerateRequest(request_id="e2", prompt_token_ids=[1] * 9000), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
            (worker_pb2.WorkerGenerateRequest(request_id="e3", prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(top_p=2)),
             grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
            (worker_pb2.WorkerGenerateRequest(request_id="e4", prompt_token_ids=[1, 2], first_token_id=3,
                                              kv_handle=common_pb2.KVHandle(num_tokens=2, layout_fingerprint="0123456789abcdef")),
             grpc.StatusCode.FAILED_PRECONDITION, "KV layout mismatch"),
        ]  # fmt: skip
        for request, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [c async for c in decode_stub.Generate(request, timeout=5)]
            assert err.value.code() == code and text in err.value.details(), (request.request_id, err.value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await prefill_stub.Prefill(worker_pb2.PrefillRequest(request_id="e5", decode_kv_address=b"decode"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # every KV handle is bound to a decode worker
            await prefill_stub.Prefill(worker_pb2.PrefillRequest(request_id="e6", prompt_token_ids=[1, 2]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode_kv_address is required" in err.value.details()
        released = await prefill_stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="nope", transfer_token=b"x"), timeout=5)
        assert not released.released
    assert decoder.engine.stats().num_used_blocks == 0
    await check_all(fleet)


async def test_cancelled_generation_frees_the_workers_blocks(sim_cluster):
    fleet, gateway = sim_cluster
    request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=list(range(100, 400))), sampling=common_pb2.SamplingParams(max_tokens=5000))
    call = gateway.stub.Generate(request, timeout=30)
    await call.read()
    assert sum(w.engine.stats().num_running for w in fleet.decode) == 1
    call.cancel()
    await eventually(
        lambda: all(w.engine.stats().num_used_blocks == 0 and not w.engine.requests for w in fleet.workers), "the aborted request's blocks to be freed"
    )
    await check_all(fleet)


async def test_restart_comes_back_with_a_new_identity_and_an_empty_cache(sim_cluster, etcd, cluster_name):
    fleet, gateway = sim_cluster
    await gateway.generate(list(range(7000, 7000 + 4 * BS)), max_tokens=2)
    worker = next(w for w in fleet.decode if w.cache.num_cached_blocks)
    await eventually(lambda: _indexed_at_least(gateway, worker.worker_id, 4), "the gateway to index the worker's blocks")
    before = (await keys(etcd, cluster_name))[worker.key]
    await worker.restart()
    after = (await keys(etcd, cluster_name))[worker.key]
    assert after.started_unix_ms > before.started_unix_ms and after.grpc_address == before.grpc_address
    assert worker.cache.num_cached_blocks == 0 and worker.host.kv_log.sequence == 0
    await eventually(lambda: _indexed_at_most(gateway, worker.worker_id, 0), "the gateway to forget the restarted worker's blocks")
    await eventually(lambda: gateway.connected(3), "the gateway to reconnect to the restarted worker")
    assert worker.key in await keys(etcd, cluster_name), "revoking the old lease must not delete the re-registered key"
    chunks = await gateway.generate(list(range(7000, 7000 + 4 * BS)), max_tokens=2)
    assert len(tokens(chunks)) == 2
    await check_all(fleet)


async def _indexed_at_least(gateway, worker_id: str, n: int) -> bool:
    return (await gateway.indexed()).get(worker_id, 0) >= n


async def _indexed_at_most(gateway, worker_id: str, n: int) -> bool:
    return (await gateway.indexed()).get(worker_id, 0) <= n


async def test_a_fleet_of_200_starts_registers_and_stops_without_leftover_keys(etcd, cluster_name):
    fleet = SimFleet(etcd, cluster_name, num_decode=180, num_prefill=20, timing=TimingModel.instant())
    t0 = time.perf_counter()
    await fleet.start()
    try:
        started = time.perf_counter() - t0
        regs = await keys(etcd, cluster_name)
        assert len(regs) == 200 and len(set(fleet.addresses.values())) == 200
        assert sum(r.role == "prefill" for r in regs.values()) == 20
        assert started < 30, f"200 simulated workers took {started:.1f}s to start and register"
        request = worker_pb2.WorkerGenerateRequest(prompt_token_ids=[5] * 40, sampling=common_pb2.SamplingParams(max_tokens=3))
        async with grpc.aio.insecure_channel(fleet.decode[-1].address) as ch:  # one of them serves, as a sample
            chunks = [c async for c in worker_pb2_grpc.DecodeStub(ch).Generate(request, timeout=5)]
        assert chunks[-1].usage.completion_tokens == 3
    finally:
        await fleet.stop()
    assert await keys(etcd, cluster_name) == {}
    leftover = [t for t in asyncio.all_tasks() if not t.done() and (t.get_name() == "sim-engine" or cluster_name in t.get_name())]
    assert not leftover, f"tasks left running: {leftover[:3]}"


async def test_the_command_line_fleet_reports_ready_and_stops_cleanly_on_sigterm(etcd, cluster_name):
    cmd = [sys.executable, "-m", "loadtest.sim.fleet", "--etcd", etcd, "--cluster", cluster_name, "--decode", "3", "--prefill", "1",
           "--instant", "--json", "--lease-ttl", "3"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, (await proc.stderr.read()).decode()
        ready = json.loads(line)
        assert ready["ready"] == 4 and {w["role"] for w in ready["workers"]} == {"decode", "prefill"}
        regs = await keys(etcd, cluster_name)
        assert {r.grpc_address for r in regs.values()} == {w["address"] for w in ready["workers"]}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert await keys(etcd, cluster_name) == {}, "every lease is revoked on SIGTERM"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
