"""WorkerHandle.in_flight: the one place a worker's in-flight requests and prompt-token backlog are
counted. Every way out of the block (normal end, an exception, a cancellation, a generator closed
early) must give the count back: a leak would skew routing for the rest of the process's life."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.worker_pool import WorkerHandle
from protos.tandem.v1 import common_pb2


@pytest.fixture
async def handle():
    # a decode worker at an address nobody serves: its Watch stream just retries in the background
    h = WorkerHandle("k", common_pb2.WorkerRegistration(worker_id="d", role="decode", grpc_address="127.0.0.1:1"))
    yield h
    await h.retire()


def counts(h) -> tuple[int, int]:
    return h.num_in_flight, h.num_in_flight_tokens


async def test_counts_while_the_block_runs_and_gives_back_after(handle):
    with handle.in_flight(100):
        assert counts(handle) == (1, 100)
        with handle.in_flight():
            assert counts(handle) == (2, 100)
    assert counts(handle) == (0, 0)


async def test_computed_takes_the_tokens_out_of_the_backlog_once(handle):
    with handle.in_flight(100) as request, handle.in_flight(30):
        request.computed()
        request.computed()  # idempotent: a second first-token signal must not subtract again
        assert counts(handle) == (2, 30)
    assert counts(handle) == (0, 0)


async def test_an_exception_gives_the_count_back(handle):
    with pytest.raises(RuntimeError), handle.in_flight(50):
        raise RuntimeError("the worker call failed")
    assert counts(handle) == (0, 0)


async def test_a_cancelled_task_gives_the_count_back(handle):
    entered = asyncio.Event()

    async def request():
        with handle.in_flight(50):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(request())
    await entered.wait()
    assert counts(handle) == (1, 50)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts(handle) == (0, 0)


async def test_a_stream_closed_early_gives_the_count_back(handle):
    async def stream():
        with handle.in_flight(50):
            for i in range(10):
                yield i

    async with contextlib.aclosing(stream()) as chunks:
        assert await anext(chunks) == 0
        assert counts(handle) == (1, 50)
    assert counts(handle) == (0, 0)


async def test_a_retired_handle_closes_its_channel_after_its_last_request():
    h = WorkerHandle("k", common_pb2.WorkerRegistration(worker_id="d", role="decode", grpc_address="127.0.0.1:1"))
    with h.in_flight():
        await h.retire()  # the worker left etcd while our request ran on it: the channel stays open
        assert not hasattr(h, "_closing")
    await h._closing  # the last request ended: the channel closes now
