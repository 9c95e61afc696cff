"""WorkerPool.wait_until_ready: a request that finds its worker registered but still connecting
(its Watch stream has not answered yet: just started or restarted) waits for it, bounded, instead
of failing UNAVAILABLE. Real WorkerPool and WorkerHandle, a real grpc.aio Worker server on
loopback that comes up after the handle started trying; no etcd (the pool is never started)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import grpc
import pytest

from gateway import worker_pool
from gateway.worker_pool import WorkerHandle, WorkerPool
from protos.tandem.v1 import common_pb2, worker_pb2_grpc
from services.common.watch_hub import WatchHub
from services.common.worker_servicer import WorkerServicer
from tandem.launcher import free_port
from tests.helpers.waiting import eventually

KEY = "/tandem/c/workers/decode/d"
WAIT_S = 20.0  # generous: grpc's own reconnect backoff (1 s, growing) comes on top of WATCH_RETRY_S


def registration(port: int, role: str = "decode") -> common_pb2.WorkerRegistration:
    return common_pb2.WorkerRegistration(worker_id="d", role=role, grpc_address=f"127.0.0.1:{port}", model="m")


def stats(num_running: int) -> SimpleNamespace:
    """What WatchHub.publish reads of an engine's stats."""
    return SimpleNamespace(num_running=num_running, num_waiting=0, kv_cache_usage=0.0, num_used_blocks=num_running, num_total_blocks=8,
                           num_pending_prefill_tokens=0)  # fmt: skip


async def serve_worker(port: int) -> tuple[grpc.aio.Server, WatchHub]:
    """A Worker service at `port`; its Watch sends the current load on subscribe (WatchHub)."""
    hub, server = WatchHub("d"), grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(hub), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server, hub


def other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@contextlib.asynccontextmanager
async def unstarted_pool():
    """A WorkerPool that is never started (no etcd); every handle retired on the way out, and no
    task of ours left behind."""
    before = other_tasks()
    pool = WorkerPool("127.0.0.1:1", "c")
    assert pool.watcher._task is None, "constructing a pool must not connect to etcd"
    try:
        yield pool
    finally:
        await pool.close()
        # grpc finishes a cancelled call's status in a task of its own, a loop turn or two later
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not other_tasks() - before, "every task to end", timeout=5)
        assert not other_tasks() - before, f"leaked tasks: {other_tasks() - before}"


def returns_at_once(coro) -> object:
    """The value of `coro` if it finishes without ever suspending (raises AssertionError if not)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("it suspended: it waited instead of answering at once")


async def test_waiters_wake_when_the_registered_worker_connects():
    port = free_port()
    async with unstarted_pool() as pool:
        await pool._put(KEY, registration(port))  # nothing listens there yet: its Watch keeps retrying
        handle = pool.workers[KEY]
        assert not handle.connected and pool.registered("decode") and not pool.ready("decode")
        assert await pool.wait_until_ready("decode", 0.3) is False  # not up yet: the bound holds
        # two requests waiting at once, both from before the worker came up
        waiters = [asyncio.create_task(pool.wait_until_ready("decode", WAIT_S)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        server, _ = await serve_worker(port)
        try:
            assert await asyncio.gather(*waiters) == [True, True]
            assert handle.connected and pool.ready("decode") == [handle]
            assert returns_at_once(pool.wait_until_ready("decode", WAIT_S)) is True  # ready: no wait
        finally:
            await pool._remove(KEY)  # retires the handle (its Watch task ends, its channel closes)
            await server.stop(None)
        assert handle.retired and not handle.connected


async def test_no_registered_worker_of_the_role_answers_false_at_once():
    async with unstarted_pool() as pool:
        assert returns_at_once(pool.wait_until_ready("decode", WAIT_S)) is False
        await pool._put("/tandem/c/workers/prefill/d", registration(free_port(), role="prefill"))
        # a prefill worker connecting is nothing a decode request can wait for
        assert returns_at_once(pool.wait_until_ready("decode", WAIT_S)) is False


async def test_on_connected_is_called_on_each_transition_not_on_each_event():
    port = free_port()
    server, hub = await serve_worker(port)
    calls = []
    handle = WorkerHandle(KEY, registration(port), on_connected=lambda: calls.append(handle.connected))
    try:
        await eventually(lambda: handle.connected, "the handle's Watch stream to answer")
        hub.publish(stats(1), [])
        hub.publish(stats(2), [])
        await eventually(lambda: handle.load is not None and handle.load.num_requests_running == 2, "the later load snapshots")
        assert calls == [True], "called once, when the handle became connected (and already connected then)"
        handle.mark_unreachable()  # a call failed UNAVAILABLE; the next event brings it back
        hub.publish(stats(3), [])
        await eventually(lambda: handle.connected, "the next event to reconnect the handle")
        assert calls == [True, True]
    finally:
        await handle.retire()
        await server.stop(None)
    handle.mark_connected()  # a retired handle stays out of routing
    assert not handle.connected and calls == [True, True]


@pytest.mark.parametrize("timeout", [0.0, -1.0])
async def test_a_spent_timeout_answers_with_what_is_ready_now(timeout):
    async with unstarted_pool() as pool:
        await pool._put(KEY, registration(free_port()))
        assert await pool.wait_until_ready("decode", timeout) is False


async def test_a_restarted_worker_is_reached_at_once_while_its_old_handle_still_retries(monkeypatch):
    """A worker restarted at the same address gets a new handle while the old one may still be open
    (retiring, its requests draining). The new handle's channel must not wait out the old channel's
    reconnect backoff: grpc shares one subchannel between channels of the same target and options
    unless each channel keeps its own pool, and a backoff that grew while the worker was down then
    held the restarted worker out of routing for seconds (0.1-3.0 s in the chaos test). The backoff
    is stretched to 20 s here, so that a shared subchannel cannot go unnoticed."""
    stretched = [("grpc.initial_reconnect_backoff_ms", 20_000), ("grpc.min_reconnect_backoff_ms", 20_000)]
    monkeypatch.setattr(worker_pool, "CHANNEL_OPTIONS", [*worker_pool.CHANNEL_OPTIONS, *stretched])
    port = free_port()
    old = WorkerHandle(KEY, registration(port))  # the dead process's handle: its Watch keeps failing
    new = server = None
    try:
        await asyncio.sleep(0.5)  # its first connection was refused: its subchannel waits out the backoff
        assert not old.connected
        server, _ = await serve_worker(port)  # the restarted process
        new = WorkerHandle(KEY, registration(port))
        await eventually(lambda: new.connected, "the new handle's Watch stream to answer", timeout=5)
    finally:
        for handle in (old, new):
            if handle is not None:
                await handle.retire()
        if server is not None:
            await server.stop(None)
