"""The gateway's decode leg: the continuation request a migration sends, and the retry / migrate /
give-up decisions, against fake decode workers that fail on cue."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import grpc
import pytest

from gateway.decode_leg import DecodeLeg, continuation_request
from gateway.outlier_detection import OutlierDetectionConfig, OutlierDetector
from gateway.scheduling.base import RequestContext
from protos.tandem.v1 import common_pb2, worker_pb2
from services.common.errors import RequestError
from services.common.metrics import GatewayMetrics
from tests.helpers.fake_decode_call import FakeDecodeCall


def original_request() -> worker_pb2.WorkerGenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=20, temperature=0.7, seed=11, stop=["\n\n"], ignore_eos=True, logprobs=2)
    return worker_pb2.WorkerGenerateRequest(request_id="r1", prompt_token_ids=[5, 6, 7], sampling=sampling, cache_salt="salt")


def test_continuation_carries_the_prompt_the_streamed_tokens_and_the_sampling():
    original = original_request()
    cont = continuation_request(original, [40, 41, 42])
    assert list(cont.prompt_token_ids) == [5, 6, 7]  # the prompt is unchanged: usage.prompt_tokens stays right
    assert list(cont.resume_token_ids) == [40, 41, 42]
    assert cont.sampling == original.sampling  # max_tokens, seed, stop, ignore_eos, logprobs: the worker counts the resumed tokens
    assert (cont.request_id, cont.cache_salt) == ("r1", "salt")
    assert not original.resume_token_ids  # not mutated


def test_continuation_of_a_disaggregated_request_drops_the_kv_handle():
    original = original_request()
    original.kv_handle.request_id, original.first_token_id = "r1", 40
    cont = continuation_request(original, [40, 41])
    assert not cont.HasField("kv_handle") and not cont.HasField("first_token_id")
    assert list(cont.resume_token_ids) == [40, 41]


def test_a_second_migration_resumes_from_everything_streamed():
    first = continuation_request(original_request(), [40, 41])
    assert list(continuation_request(first, [42]).resume_token_ids) == [40, 41, 42]


class FakeWorker:
    """A decode worker handle; `script` is one (tokens, failure code or None) per call it gets."""

    def __init__(self, key, script, cached=0):
        self.key = self.worker_id = key
        self.role = "decode"
        self.ejected_until, self.connected, self.retired = 0.0, True, False
        self.num_in_flight = 0
        self.script = list(script)
        self.cached = cached
        self.requests: list[worker_pb2.WorkerGenerateRequest] = []

    @contextlib.contextmanager
    def in_flight(self, num_tokens=0):
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1

    def mark_unreachable(self):
        self.connected = False

    def decode_stub(self):
        return SimpleNamespace(Generate=self._generate)

    def _generate(self, request, timeout=None):
        self.requests.append(request)
        tokens, fail = self.script.pop(0)
        n = len(request.prompt_token_ids)
        done = len(request.resume_token_ids) + len(tokens)
        return FakeDecodeCall(tokens, fail, common_pb2.Usage(prompt_tokens=n, completion_tokens=done, cached_prompt_tokens=self.cached))


class FakePool:
    def __init__(self, workers):
        self.workers = {w.key: w for w in workers}
        self.outliers = OutlierDetector(OutlierDetectionConfig())
        self.outcomes = []

    def registered(self, role):
        return list(self.workers.values())

    def record_outcome(self, handle, code):
        self.outcomes.append((handle.key, code))


class FirstHealthyRouter:
    policy = "fake"

    def pick(self, ctx, candidates, observe=None):
        return next((c for c in candidates if c.connected), None)


async def run_leg(workers, max_migrations=2, streamed=()):
    pool = FakePool(workers)
    leg = DecodeLeg(pool, FirstHealthyRouter(), GatewayMetrics(), max_migrations)
    chunks = []
    async for chunk in leg.stream(original_request(), lambda: 30.0, RequestContext("r1", 3), workers[0], streamed_token_ids=streamed):
        chunks.append(chunk)
    return chunks, pool


UNAVAILABLE, INTERNAL, INVALID = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT


async def test_a_worker_dying_mid_stream_is_migrated_with_no_token_lost_or_repeated():
    a = FakeWorker("a", [([40, 41, 42], UNAVAILABLE)])
    b = FakeWorker("b", [([43, 44], None)], cached=9)  # its prefix cache held prompt + resumed tokens
    chunks, pool = await run_leg([a, b])
    assert [t for c in chunks for t in c.token_ids] == [40, 41, 42, 43, 44]
    assert list(b.requests[0].resume_token_ids) == [40, 41, 42] and list(b.requests[0].prompt_token_ids) == [5, 6, 7]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (3, 5, 3)  # cached: the prompt's only
    assert pool.outcomes == [("a", UNAVAILABLE), ("b", grpc.StatusCode.OK)]


async def test_a_failure_before_the_first_chunk_retries_the_same_request_elsewhere():
    a = FakeWorker("a", [([], INTERNAL)])
    b = FakeWorker("b", [([40, 41], None)])
    chunks, _ = await run_leg([a, b])
    assert [t for c in chunks for t in c.token_ids] == [40, 41]
    assert b.requests[0] == original_request()  # no continuation: nothing was streamed


async def test_the_prefill_workers_first_token_is_resumed_too():
    a = FakeWorker("a", [([41], UNAVAILABLE)])
    b = FakeWorker("b", [([42], None)])
    chunks, _ = await run_leg([a, b], streamed=[40])
    assert list(b.requests[0].resume_token_ids) == [40, 41]


@pytest.mark.parametrize("max_migrations", [0, 1])
async def test_the_migration_budget_ends_the_request_with_unavailable(max_migrations):
    workers = [FakeWorker(k, [([40 + i], UNAVAILABLE)]) for i, k in enumerate("abc")]
    chunks = []
    with pytest.raises(RequestError) as e:
        pool = FakePool(workers)
        leg = DecodeLeg(pool, FirstHealthyRouter(), GatewayMetrics(), max_migrations)
        async for chunk in leg.stream(original_request(), lambda: 30.0, RequestContext("r1", 3), workers[0]):
            chunks.append(chunk)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "max_migrations" in str(e.value)
    assert len(chunks) == max_migrations + 1


async def test_no_other_worker_ends_the_request_with_unavailable():
    with pytest.raises(RequestError) as e:
        await run_leg([FakeWorker("a", [([40], UNAVAILABLE)])])
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no decode worker is reachable" in str(e.value)


async def test_an_error_about_the_request_is_not_retried():
    a = FakeWorker("a", [([], INVALID)])
    b = FakeWorker("b", [([40], None)])
    with pytest.raises(RequestError) as e:
        await run_leg([a, b])
    assert e.value.code == INVALID and not b.requests
