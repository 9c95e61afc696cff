"""Pipeline and completed(): the request bookkeeping a KV pull runs on (kvtransfer/ucx_endpoint.py).

Both work on any asyncio futures; here the requests are futures the test completes itself, so every
order of completions and failures can be driven exactly. The UCX side is covered end to end by
test_ucx_transport.py."""

from __future__ import annotations

import asyncio

import pytest

from kvtransfer.ucx_endpoint import Pipeline, completed


class Requests:
    """post(k) for a Pipeline: records the order and hands out a future per request."""

    def __init__(self, fail_post_at: int | None = None):
        self.posted: list[int] = []
        self.futures: dict[int, asyncio.Future] = {}
        self.fail_post_at = fail_post_at

    def post(self, k: int) -> asyncio.Future:
        if k == self.fail_post_at:
            raise ConnectionError(f"posting request {k} failed")
        self.posted.append(k)
        self.futures[k] = asyncio.get_running_loop().create_future()
        return self.futures[k]

    def complete(self, k: int) -> None:
        self.futures[k].set_result(True)


async def settle() -> None:
    for _ in range(3):  # done-callbacks run on the next loop iterations
        await asyncio.sleep(0)


async def test_keeps_at_most_the_window_in_flight_and_posts_in_order():
    reqs = Requests()
    pipe = Pipeline(10, 3, reqs.post)
    assert reqs.posted == [0, 1, 2] and sorted(pipe.in_flight) == [0, 1, 2]
    reqs.complete(1)  # out of order: one more is posted, the window stays 3
    await settle()
    assert reqs.posted == [0, 1, 2, 3] and sorted(pipe.in_flight) == [0, 2, 3] and pipe.completed == 1
    for k in [0, 2, 3, 4, 5, 6, 7, 8]:
        reqs.complete(k)
        await settle()
        assert len(pipe.in_flight) <= 3
        assert not pipe.finished.done()
    reqs.complete(9)
    await settle()
    assert pipe.finished.done() and pipe.finished.result() is None
    assert reqs.posted == list(range(10)) and pipe.completed == 10 and not pipe.in_flight


async def test_fewer_requests_than_the_window_and_none_at_all():
    reqs = Requests()
    pipe = Pipeline(2, 32, reqs.post)
    assert reqs.posted == [0, 1]
    reqs.complete(0)
    reqs.complete(1)
    await completed(pipe.finished, timeout=1)
    empty = Pipeline(0, 32, reqs.post)
    assert empty.finished.done() and reqs.posted == [0, 1]


async def test_the_first_failure_ends_it_and_nothing_more_is_posted():
    reqs = Requests()
    pipe = Pipeline(10, 3, reqs.post)
    reqs.futures[1].set_exception(ConnectionError("peer gone"))
    await settle()
    with pytest.raises(ConnectionError, match="peer gone"):
        await completed(pipe.finished)
    reqs.complete(0)  # completions after the failure post nothing
    await settle()
    assert reqs.posted == [0, 1, 2] and sorted(pipe.in_flight) == [2]


async def test_a_cancelled_request_fails_it():
    reqs = Requests()
    pipe = Pipeline(4, 2, reqs.post)
    reqs.futures[0].cancel()
    await settle()
    with pytest.raises(ConnectionError, match="cancelled"):
        pipe.finished.result()


async def test_a_post_that_raises_fails_it_at_the_start_and_midway():
    at_start = Pipeline(5, 3, Requests(fail_post_at=1).post)
    with pytest.raises(ConnectionError, match="posting request 1"):
        at_start.finished.result()

    reqs = Requests(fail_post_at=3)
    midway = Pipeline(5, 3, reqs.post)
    reqs.complete(0)  # its callback tries to post request 3
    await settle()
    with pytest.raises(ConnectionError, match="posting request 3"):
        midway.finished.result()
    assert reqs.posted == [0, 1, 2]


async def test_stop_posts_nothing_more_and_keeps_the_requests_in_flight():
    reqs = Requests()
    pipe = Pipeline(10, 3, reqs.post)
    pipe.stop()
    reqs.complete(0)
    await settle()
    assert pipe.finished.cancelled() and reqs.posted == [0, 1, 2] and sorted(pipe.in_flight) == [1, 2]
    failed = Pipeline(3, 3, Requests(fail_post_at=0).post)
    failed.stop()  # a failed pipeline stays failed (its error retrieved, not replaced)
    assert isinstance(failed.finished.exception(), ConnectionError)


async def test_completed_never_cancels_the_request():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    with pytest.raises(TimeoutError):
        await completed(fut, timeout=0.01)
    assert not fut.done()  # a timed-out wait leaves the request running (only an abort ends it)

    waiter = asyncio.ensure_future(completed(fut))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not fut.done()

    fut.set_result(True)
    assert await completed(fut) is True
    failed = loop.create_future()
    failed.set_exception(ConnectionError("endpoint error"))
    with pytest.raises(ConnectionError):
        await completed(failed)
