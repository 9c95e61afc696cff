"""The gateway's request path (gateway/request_path.py) end to end against fake workers: the real
router, P/D decider, prefill and decode legs, with workers that answer on cue. What it checks is
bookkeeping a cluster test cannot see exactly: every in-flight count back to zero, and the KV a
prefill worker pinned released however the request ends."""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import SimpleNamespace

import grpc
import pytest

from gateway.outlier_detection import OutlierDetectionConfig, OutlierDetector
from gateway.prefix_index import PrefixIndex
from gateway.request_path import DECODE_CONNECT_WAIT_S, RequestPath
from gateway.scheduling.router import Router
from gateway.scheduling.scheduling_config import SchedulingConfig
from gateway.worker_pool import WorkerHandle, WorkerPool
from protos.tandem.v1 import common_pb2, gateway_pb2, worker_pb2
from services.common.config import ServiceConfig
from services.common.errors import RequestError
from services.common.metrics import GatewayMetrics
from tests.helpers.fake_decode_call import FakeDecodeCall, rpc_error

AUTO, DISAGG = gateway_pb2.SERVING_MODE_AUTO, gateway_pb2.SERVING_MODE_DISAGGREGATED
PROMPT = list(range(100, 164))


class FakeWorker:
    """A worker handle counted by the real WorkerHandle.in_flight. Decode: `script` is one
    (tokens, failure or None) per Generate call. Prefill: `prefill` is its reply or an error code."""

    in_flight = WorkerHandle.in_flight
    mark_connected = WorkerHandle.mark_connected  # what the Watch stream calls when it answers

    def __init__(self, wid, role="decode", script=(), prefill=None):
        self.key = self.worker_id = wid
        self.role = role
        self.registration = common_pb2.WorkerRegistration(worker_id=wid, role=role, model="m", max_model_len=1024, kv_client_address=b"kv-" + wid.encode())
        self.registration.kv_layout.block_size = 16
        self.load, self.connected, self.retired, self.ejected_until = None, True, False, 0.0
        self.num_in_flight = self.num_in_flight_tokens = 0
        self.script, self.prefill = list(script), prefill
        self.backlog_seen: list[int] = []  # num_in_flight_tokens at each call
        self.released: list[bytes] = []  # transfer tokens of ReleaseKV calls
        self._on_connected = None  # FakePool's notifier, as WorkerPool gives its handles

    def mark_unreachable(self):
        self.connected = False

    def decode_stub(self):
        return SimpleNamespace(Generate=self._generate)

    def prefill_stub(self):
        return SimpleNamespace(Prefill=self._prefill, ReleaseKV=self._release)

    def open_decode(self, request, timeout):
        """The request over the shared stream (the default, decode_streams = shared): the same call
        as Generate's here (the stream itself has its own tests: test_decode_mux.py)."""
        return self._generate(request, timeout)

    def _generate(self, request, timeout=None):
        self.backlog_seen.append(self.num_in_flight_tokens)
        return FakeDecodeCall(*self.script.pop(0))

    async def _prefill(self, request, timeout=None):
        self.backlog_seen.append(self.num_in_flight_tokens)
        if isinstance(self.prefill, grpc.StatusCode):
            raise rpc_error(self.prefill)
        return self.prefill

    async def _release(self, request, timeout=None):
        self.released.append(request.transfer_token)
        return worker_pb2.ReleaseKVResponse(released=True)


class FakePool:
    """The real readiness logic (ready, wait_until_ready and its notifier) over fake workers."""

    ready = WorkerPool.ready
    wait_until_ready = WorkerPool.wait_until_ready
    _notify_readiness_changed = WorkerPool._notify_readiness_changed

    def __init__(self, workers):
        self.workers = {w.key: w for w in workers}
        self.index = PrefixIndex()
        self.outliers = OutlierDetector(OutlierDetectionConfig())
        self._readiness_changed = asyncio.Event()
        for w in workers:
            w._on_connected = self._notify_readiness_changed

    def registered(self, role):
        return [w for w in self.workers.values() if w.role == role]

    def served_models(self):
        return {"m": 1024}

    def record_outcome(self, handle, code):
        pass


class Context:
    """A call context whose deadline has `times` left, one value per time_remaining() call."""

    def __init__(self, *times):
        self.times = list(times)

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return self.times.pop(0) if self.times else 30.0


def make_path(workers, min_uncached_tokens=1):
    pool = FakePool(workers)
    config = ServiceConfig(role="gateway", disagg_min_uncached_tokens=min_uncached_tokens)
    scheduling = SchedulingConfig(policy="least-loaded").merged({"disaggregation": {"min_uncached_tokens": min_uncached_tokens}})
    return RequestPath(config, pool, Router(scheduling, pool.index, random.Random(0)), GatewayMetrics())


def request(mode=AUTO):
    return gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), sampling=common_pb2.SamplingParams(max_tokens=8), mode=mode)


def prefill_reply(finished=False):
    reply = worker_pb2.PrefillResponse(first=common_pb2.GenerateResponse(token_ids=[40]), num_cached_tokens=16)
    if finished:
        reply.first.finish_reason = common_pb2.FINISH_REASON_STOP
    else:
        reply.kv_handle.request_id, reply.kv_handle.transfer_token = "r", b"token"
    return reply


def all_idle(path, workers) -> bool:
    return path.admission.num_in_flight == 0 and all((w.num_in_flight, w.num_in_flight_tokens) == (0, 0) for w in workers)


def outcomes(path) -> dict[str, float]:
    return {s.labels["code"]: s.value for m in path.metrics.registry.collect() if m.name == "tandem_requests" for s in m.samples if s.name.endswith("_total")}


async def test_an_aggregated_request_counts_its_prompt_as_backlog_until_the_first_token():
    decode = FakeWorker("d", script=[([41, 42], None)])
    path = make_path([decode], min_uncached_tokens=0)  # never disaggregate
    chunks = [c async for c in path.generate(request(), Context())]
    assert [t for c in chunks for t in c.token_ids] == [41, 42]
    assert decode.backlog_seen == [len(PROMPT)]  # nothing cached: the whole prompt, counted at the decision
    assert all_idle(path, [decode]) and outcomes(path) == {"OK": 1}


async def test_a_stream_closed_early_frees_every_count():
    decode = FakeWorker("d", script=[([41, 42, 43], None)])
    path = make_path([decode], min_uncached_tokens=0)
    async with contextlib.aclosing(path.generate(request(), Context())) as stream:
        await anext(stream)
        assert decode.num_in_flight == 1 and path.admission.num_in_flight == 1
    assert all_idle(path, [decode]) and outcomes(path) == {"CANCELLED": 1}


async def test_a_disaggregated_request_streams_the_prefill_workers_token_then_decode():
    decode, prefill = FakeWorker("d", script=[([41], None)]), FakeWorker("p", role="prefill", prefill=prefill_reply())
    path = make_path([decode, prefill])
    chunks = [c async for c in path.generate(request(), Context())]
    assert [t for c in chunks for t in c.token_ids] == [40, 41]
    assert prefill.backlog_seen == [len(PROMPT)] and decode.backlog_seen == [0]  # the prompt is the prefill worker's to compute
    await path.close()  # waits for the background ReleaseKV
    assert prefill.released == [b"token"]
    assert all_idle(path, [decode, prefill])


async def test_a_client_gone_at_the_first_token_releases_the_pinned_kv_now():
    decode, prefill = FakeWorker("d", script=[([41], None)]), FakeWorker("p", role="prefill", prefill=prefill_reply())
    path = make_path([decode, prefill])
    async with contextlib.aclosing(path.generate(request(), Context())) as stream:
        assert list((await anext(stream)).token_ids) == [40]
    await path.close()
    assert prefill.released == [b"token"], "the prefill worker's blocks would stay pinned until the lease expires"
    assert not decode.backlog_seen and all_idle(path, [decode, prefill])


async def test_a_first_token_that_ends_the_request_pinned_nothing_to_release():
    decode, prefill = FakeWorker("d"), FakeWorker("p", role="prefill", prefill=prefill_reply(finished=True))
    path = make_path([decode, prefill])
    chunks = [c async for c in path.generate(request(), Context())]
    await path.close()
    assert len(chunks) == 1 and not prefill.released and all_idle(path, [decode, prefill])


async def test_a_failed_prefill_worker_falls_back_to_aggregated_and_frees_its_count():
    decode, prefill = FakeWorker("d", script=[([40, 41], None)]), FakeWorker("p", role="prefill", prefill=grpc.StatusCode.UNAVAILABLE)
    path = make_path([decode, prefill])
    chunks = [c async for c in path.generate(request(), Context())]
    assert [t for c in chunks for t in c.token_ids] == [40, 41] and not prefill.connected
    assert all_idle(path, [decode, prefill])


async def test_a_forced_disaggregation_fails_with_the_prefill_workers_status():
    decode, prefill = FakeWorker("d"), FakeWorker("p", role="prefill", prefill=grpc.StatusCode.UNAVAILABLE)
    path = make_path([decode, prefill])
    with pytest.raises(RequestError) as e:
        [c async for c in path.generate(request(DISAGG), Context())]
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and not decode.backlog_seen
    assert all_idle(path, [decode, prefill]) and outcomes(path) == {"UNAVAILABLE": 1}


async def test_a_deadline_that_expires_before_the_retry_frees_the_retry_workers_count():
    a, b = FakeWorker("a", script=[([], grpc.StatusCode.UNAVAILABLE)]), FakeWorker("b", script=[([], grpc.StatusCode.UNAVAILABLE)])
    path = make_path([a, b], min_uncached_tokens=0)
    with pytest.raises(RequestError) as e:
        # 30 s for the first decode call; none left when the leg moves on to the other worker
        [c async for c in path.generate(request(), Context(30.0, 0.0))]
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all_idle(path, [a, b]), "the worker retried on keeps a request in flight for ever"


def spy_on_waits(path) -> list[float]:
    """The timeouts of the path's waits for a decode worker to connect (the real wait still runs)."""
    timeouts, wait = [], path.pool.wait_until_ready

    async def recording(role, timeout):
        timeouts.append(timeout)
        return await wait(role, timeout)

    path.pool.wait_until_ready = recording
    return timeouts


async def test_a_request_waits_for_its_registered_decode_worker_to_connect():
    # a restarted worker: etcd has told the gateway of it, its Watch stream answers a moment later
    decode = FakeWorker("d", script=[([41, 42], None)])
    decode.connected = False
    path = make_path([decode], min_uncached_tokens=0)
    waits = spy_on_waits(path)
    asyncio.get_running_loop().call_later(0.05, decode.mark_connected)
    chunks = [c async for c in path.generate(request(), Context(30.0))]
    assert [t for c in chunks for t in c.token_ids] == [41, 42], "failed UNAVAILABLE although the worker was about to be ready"
    assert waits == [DECODE_CONNECT_WAIT_S]  # the client's 30 s are more than the bound
    assert all_idle(path, [decode]) and outcomes(path) == {"OK": 1}


async def test_a_decode_worker_that_never_connects_ends_unavailable_within_the_deadline():
    decode = FakeWorker("d", script=[([41], None)])
    decode.connected = False
    path = make_path([decode], min_uncached_tokens=0)
    waits = spy_on_waits(path)
    with pytest.raises(RequestError) as e:
        [c async for c in path.generate(request(), Context(0.1))]
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "none ready" in str(e.value), e.value
    assert waits == [0.1], "the wait must end with the client's deadline, not DECODE_CONNECT_WAIT_S later"
    assert not decode.backlog_seen and all_idle(path, [decode]) and outcomes(path) == {"UNAVAILABLE": 1}


async def test_no_registered_decode_worker_fails_at_once_without_waiting():
    path = make_path([FakeWorker("p", role="prefill", prefill=prefill_reply())])
    waits = spy_on_waits(path)
    with pytest.raises(RequestError) as e:
        [c async for c in path.generate(request(), Context())]
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no decode workers are registered" in str(e.value)
    assert waits == []
