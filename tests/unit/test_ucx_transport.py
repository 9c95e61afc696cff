"""The UCX KV transport between real processes on loopback (kvtransfer/ucx_transport.py).

Peers run in spawned processes driven over a Pipe; every wait is bounded and every child is
killed in a finally. Caches are small (2 MiB) and segments tiny (2 blocks) so pulls cross many
segments; the kill tests slow the peer's segment posts down so the kill lands mid-pull.

The clients here pull as UCX messages (local_reads=False), the path between hosts; pulls that read
the server's memory on its host are tested in test_kv_local_read.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from kvtransfer.ucx_runtime import UcxRuntime
from kvtransfer.ucx_transport import KVTransferError, KVTransportClient, KVTransportServer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 is not installed")

SHAPE = dict(L=4, H=2, NB=64, BS=16, D=32)  # fp32: 32 KiB blocks
SEGMENT_BYTES = 2 * 4 * 2 * 2 * 16 * 32 * 4  # two fp32 blocks
SPAWN = mp.get_context("spawn")
WAIT = 30.0  # bound on any wait for a child


def make_cache(dtype: torch.dtype, seed: int | None, num_blocks: int = SHAPE["NB"]) -> torch.Tensor:
    s = SHAPE
    shape = (num_blocks, s["L"], 2, s["H"], s["BS"], s["D"])  # block-major, as the engine's
    if seed is None:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _slow(fn, delay: float, conn=None):
    """fn, each call announced on conn and delayed (it runs on the UCX loop: the next segment waits)."""

    def slowed(*args):
        if conn is not None:
            conn.send("copying")
        time.sleep(delay)
        return fn(*args)

    return slowed


# -- child processes (module level: spawn imports them by name) ---------------------------------


def server_child(conn, dtype_name: str, seed: int, slow_send: float, local_reads: bool = True) -> None:
    import uvloop

    import kvtransfer.ucx_server as S

    if slow_send:  # before each segment's send
        S.segment_buffer = _slow(S.segment_buffer, slow_send, conn)

    async def main():
        server = KVTransportServer(make_cache(getattr(torch, dtype_name), seed), segment_bytes=SEGMENT_BYTES, local_reads=local_reads)
        await server.start()
        conn.send(server.address)
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg[0] == "expose":  # token, block ids, expiry, the one client address it is for
                server.expose(*msg[1:4], peer_address=msg[4])
                conn.send("ok")
            elif msg[0] == "revoke":
                server.revoke(msg[1])
            elif msg[0] == "quit":
                await server.close()
                conn.send("bye")
                return

    uvloop.run(main())


def client_child(conn, server_address: bytes, token: bytes, src: list[int], dst: list[int], timeout: float = 20.0) -> None:
    """Sends its UCX address (a server binds the token to it), waits for "go", pulls, reports."""
    import uvloop

    async def main():
        cache = make_cache(torch.float32, None)
        client = KVTransportClient(cache, local_reads=False)
        await client.start()
        conn.send(client.address)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        try:
            await client.pull(server_address, token, src, dst, timeout=timeout)
        except KVTransferError as e:
            conn.send(("error", str(e)))
            return
        expected = make_cache(torch.float32, 1)[src]
        conn.send(("ok", bool(torch.equal(cache[dst], expected))))

    uvloop.run(main())


def recv(conn, timeout: float = WAIT):
    assert conn.poll(timeout), f"no message from the child within {timeout} s"
    return conn.recv()


class Child:
    """A spawned peer; killed for sure when the test ends."""

    def __init__(self, target, *args):
        self.conn, child_conn = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=target, args=(child_conn, *args), daemon=True)
        self.proc.start()

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)  # reap it: a zombie still passes UCX's pid-based liveness check

    def call(self, *msg):
        self.conn.send(msg)
        return recv(self.conn)


class ClientChild(Child):
    """A pulling peer in its own process (its own UCX worker, so its own address)."""

    def __init__(self, server_address: bytes, token: bytes, src: list[int], dst: list[int], timeout: float = 20.0):
        super().__init__(client_child, server_address, token, src, dst, timeout)
        try:
            self.address = recv(self.conn)
        except BaseException:
            self.kill()
            raise

    def go(self) -> None:
        self.conn.send("go")


class ServerChild(Child):
    def __init__(self, dtype: str = "float32", seed: int = 1, slow_send: float = 0.0, local_reads: bool = True):
        super().__init__(server_child, dtype, seed, slow_send, local_reads)
        try:
            self.address = recv(self.conn)
        except BaseException:
            self.kill()
            raise

    def expose(self, token: bytes, ids: list[int], ttl: float = 60.0, peer: bytes | None = None) -> None:
        """Expose for `peer` (default: this test process's client, whose UCX worker is the process's)."""
        assert self.call("expose", token, ids, time.time() + ttl, peer if peer is not None else UcxRuntime.get().address()) == "ok"


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for c in started:
        c.kill()


@pytest.fixture(scope="module")
def fp32_server():
    server = ServerChild("float32")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def client():
    """(client, its cache): a client that pulls as UCX messages."""
    cache = make_cache(torch.float32, None)
    c = KVTransportClient(cache, local_reads=False)
    await c.start()
    yield c, cache
    await c.close()


async def arecv(conn, timeout: float = WAIT):
    return await asyncio.to_thread(recv, conn, timeout)


def random_blocks(n: int, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(SHAPE["NB"], generator=g)[:n].tolist(), torch.randperm(SHAPE["NB"], generator=g)[:n].tolist()


# -- round trips ---------------------------------------------------------------------------------


async def test_round_trip_fp32(fp32_server, client):
    client, cache = client
    src, dst = random_blocks(23, seed=5)  # scattered ids: 23 segments of one block
    fp32_server.expose(b"tok-fp32", src)
    assert await client.pull(fp32_server.address, b"tok-fp32", src, dst, timeout=20) == "messages"
    assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])


async def test_round_trip_bf16_with_consecutive_runs(children):
    server = ServerChild("bfloat16", seed=2)
    children.append(server)
    cache = make_cache(torch.bfloat16, None)
    c = KVTransportClient(cache, local_reads=False)
    await c.start()
    src = [3, 4, 5, 6, 40, 41, 9, 63, 0]  # runs consecutive on both sides (cut at 2 blocks) and single blocks
    dst = [10, 11, 12, 13, 14, 2, 3, 60, 61]
    server.expose(b"tok-bf16", src)
    await c.pull(server.address, b"tok-bf16", src, dst, timeout=20)
    assert torch.equal(cache[dst], make_cache(torch.bfloat16, 2)[src])
    untouched = [b for b in range(SHAPE["NB"]) if b not in dst]
    assert not cache[untouched].any()
    await c.close()


async def test_concurrent_pulls_land_and_never_run_ucxx_out_of_futures(fp32_server, capfd):
    """Six pulls at once from one server, each of scattered blocks (one segment a block), post
    ~200 receives here in one burst: more than ucxx's pool of request futures, which its notifier
    thread refills only when it wakes. Every pull must land, and without ucxx's "No Futures
    available" warning (printed for each request that finds the pool empty)."""
    cache = make_cache(torch.float32, None, num_blocks=4 * SHAPE["NB"])  # room for six disjoint pulls
    client = KVTransportClient(cache, local_reads=False)
    await client.start()
    try:
        g = torch.Generator().manual_seed(11)
        pulls = []
        for i in range(6):
            src = torch.randperm(SHAPE["NB"], generator=g)[:40].tolist()
            dst = [b + i * 40 for b in torch.randperm(40, generator=g).tolist()]  # disjoint between pulls
            token = f"burst-{i}".encode()
            fp32_server.expose(token, src)
            pulls.append((token, src, dst))
        capfd.readouterr()
        await asyncio.gather(*(client.pull(fp32_server.address, t, s, d, timeout=20) for t, s, d in pulls))
        printed = "".join(capfd.readouterr())  # ucxx logs on stdout
        source = make_cache(torch.float32, 1)
        for _, src, dst in pulls:
            assert torch.equal(cache[dst], source[src])
        assert "No Futures available" not in printed
    finally:
        await client.close()


@pytest.mark.parametrize("local_reads", [False, True])
async def test_pulls_taken_in_another_order_than_their_exposes_all_land(fp32_server, local_reads):
    """Eight loops at once, each exposing three grants and pulling them in the reverse order: every
    pull lands. Guards the one-endpoint-pair-per-pull rule: UCX pairs the n-th endpoint one worker
    dials to another with the n-th the other dials back, so a server that dialed at expose time
    (ahead of the pulls, in expose order) had its endpoints wired to other pulls' and torn down
    with them (12 of 960 pulls failed "Request canceled")."""
    cache = make_cache(torch.float32, None, num_blocks=2 * SHAPE["NB"])
    client = KVTransportClient(cache, local_reads=local_reads)
    await client.start()
    source, failures = make_cache(torch.float32, 1), []

    async def loop_of_pulls(w: int) -> None:
        g = torch.Generator().manual_seed(100 + w)
        for r in range(20):
            grants = []
            for j in range(3):
                n = int(torch.randint(1, 5, (1,), generator=g))
                src = torch.randperm(SHAPE["NB"], generator=g)[:n].tolist()
                token = f"order-{local_reads}-{w}-{r}-{j}".encode()
                fp32_server.expose(token, src)
                grants.append((token, src, [12 * w + 4 * j + i for i in range(n)]))  # disjoint across loops
            for token, src, dst in reversed(grants):
                try:
                    await client.pull(fp32_server.address, token, src, dst, timeout=20)
                except KVTransferError as e:
                    failures.append(str(e))
                    continue
                if not torch.equal(cache[dst], source[src]):
                    failures.append(f"{token!r}: wrong bytes")
            await asyncio.sleep(0)

    try:
        await asyncio.wait_for(asyncio.gather(*(loop_of_pulls(w) for w in range(8))), 120)
    finally:
        await client.close()
    assert failures == []


# -- token checks --------------------------------------------------------------------------------


async def test_wrong_token_rejected(fp32_server, client):
    client, cache = client
    fp32_server.expose(b"right", [1, 2])
    # an unknown token gets no answer at all: the server never dials a sender without a token
    with pytest.raises(KVTransferError, match="timed out after 1.0 s while waiting for the server's answer"):
        await client.pull(fp32_server.address, b"wrong", [1, 2], [1, 2], timeout=1.0)
    assert not cache[[1, 2]].any()
    await client.pull(fp32_server.address, b"right", [1, 2], [1, 2], timeout=10)  # not burnt by the miss


async def test_reused_token_rejected(fp32_server, client):
    client, cache = client
    fp32_server.expose(b"once", [7])
    await client.pull(fp32_server.address, b"once", [7], [7], timeout=10)
    with pytest.raises(KVTransferError, match="already used"):
        await client.pull(fp32_server.address, b"once", [7], [8], timeout=10)


async def test_block_not_exposed_rejected(fp32_server, client):
    client, cache = client
    fp32_server.expose(b"some", [1, 2, 3])
    with pytest.raises(KVTransferError, match=r"blocks \[4\] were not exposed"):
        await client.pull(fp32_server.address, b"some", [1, 4], [1, 4], timeout=10)
    assert not cache[[1, 4]].any()  # nothing moved


async def test_expired_token_rejected(fp32_server, client):
    client, cache = client
    fp32_server.expose(b"stale", [5], ttl=-1.0)
    with pytest.raises(KVTransferError, match="expired"):
        await client.pull(fp32_server.address, b"stale", [5], [5], timeout=10)


async def test_bad_arguments_raise_kv_transfer_error(fp32_server, client):
    client, cache = client
    with pytest.raises(KVTransferError, match="destination"):
        await client.pull(fp32_server.address, b"x", [1, 2], [1], timeout=10)
    with pytest.raises(KVTransferError, match="not a Tandem UCX"):
        await client.pull(b"garbage", b"x", [1], [1], timeout=10)


async def test_timeout_then_client_still_works(fp32_server, client):
    client, cache = client
    silent = KVTransportServer(make_cache(torch.float32, 1))  # in this process, closed: never answers
    await silent.start()
    await silent.close()
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="timed out after 1.0 s while waiting for the server's answer"):
        await client.pull(silent.address, b"t", [1], [1], timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    fp32_server.expose(b"after-timeout", [2, 3])
    await client.pull(fp32_server.address, b"after-timeout", [2, 3], [4, 5], timeout=10)
    assert torch.equal(cache[[4, 5]], make_cache(torch.float32, 1)[[2, 3]])


# -- peer death ----------------------------------------------------------------------------------


async def test_server_killed_mid_pull_then_new_server(children, client):
    client, cache = client
    server = ServerChild(slow_send=0.2)  # 23 segments: ~4.6 s of sending
    children.append(server)
    src, dst = random_blocks(23, seed=7)
    server.expose(b"doomed", src)
    pull = asyncio.ensure_future(client.pull(server.address, b"doomed", src, dst, timeout=15))
    assert await arecv(server.conn) == "copying"  # the server is inside the pull
    await asyncio.sleep(0.3)
    server.kill()
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="server gone|connection"):
        await asyncio.wait_for(pull, 15)
    assert time.monotonic() - t0 < 5.0  # noticed by UCX (keepalive 1 s), not by the 15 s timeout

    fresh = ServerChild()
    children.append(fresh)
    fresh.expose(b"fresh", src)
    await client.pull(fresh.address, b"fresh", src, dst, timeout=15)
    assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])


async def test_client_killed_mid_pull_server_serves_next(children, monkeypatch):
    import threading

    import kvtransfer.ucx_server as S

    done: list[tuple[bytes, bool]] = []
    sending, slow = threading.Event(), [True]

    def slowed(*args):  # on this process's UCX loop: the victim's segments go out 0.2 s apart
        sending.set()
        if slow[0]:
            time.sleep(0.2)
        return S.segment_buffer.__wrapped__(*args)

    slowed.__wrapped__ = S.segment_buffer
    monkeypatch.setattr(S, "segment_buffer", slowed)
    server = KVTransportServer(make_cache(torch.float32, 1), segment_bytes=SEGMENT_BYTES, on_pull_done=lambda t, ok: done.append((t, ok)))
    await server.start()
    try:
        src, dst = random_blocks(23, seed=9)
        victim = ClientChild(server.address, b"victim", src, dst)
        children.append(victim)
        server.expose(b"victim", src, time.time() + 60, peer_address=victim.address)
        victim.go()
        assert await asyncio.to_thread(sending.wait, WAIT)  # the server is inside the pull
        await asyncio.sleep(0.3)
        victim.kill()
        for _ in range(100):  # the server notices (endpoint error or keepalive) and fails that pull
            if done:
                break
            await asyncio.sleep(0.1)
        assert done == [(b"victim", False)]
        slow[0] = False

        nxt = ClientChild(server.address, b"next", src, dst)
        children.append(nxt)
        server.expose(b"next", src, time.time() + 60, peer_address=nxt.address)
        nxt.go()
        assert await arecv(nxt.conn) == ("ok", True)
        for _ in range(50):
            if len(done) == 2:
                break
            await asyncio.sleep(0.1)
        assert done[1] == (b"next", True)
    finally:
        await server.close()


async def start_slow_pull(children, client, token: bytes, n: int, seed: int, slow_send: float, timeout: float):
    """A pull from a fresh server child that sends a segment every `slow_send` s, once it is sending:
    (server, destination ids, the pull's future)."""
    server = ServerChild(slow_send=slow_send)
    children.append(server)
    src, dst = random_blocks(n, seed=seed)
    server.expose(token, src)
    pull = asyncio.ensure_future(client.pull(server.address, token, src, dst, timeout=timeout))
    assert await arecv(server.conn) == "copying"  # the server is inside the pull
    return server, dst, pull


async def test_revoke_during_pull_aborts_it(children, client):
    client, cache = client
    server, _, pull = await start_slow_pull(children, client, b"revoked", 23, seed=11, slow_send=0.2, timeout=15)
    server.conn.send(("revoke", b"revoked"))  # the lease ended: the running pull is told at once
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="server aborted the pull: the transfer token was revoked"):
        await asyncio.wait_for(pull, 15)
    assert time.monotonic() - t0 < 5.0


async def test_failed_pull_leaves_no_receive_into_the_cache(children, client):
    """The pull times out while the server still has segments to send (and the client's receives
    for them are posted straight into its cache): once pull() raises, nothing may land there."""
    client, cache = client
    server = ServerChild(slow_send=0.4)
    children.append(server)
    src, dst = random_blocks(12, seed=13)
    server.expose(b"late", src)
    with pytest.raises(KVTransferError, match="timed out after 1.0 s while receiving segment"):
        await client.pull(server.address, b"late", src, dst, timeout=1.0)
    cache[dst] = 7.0  # the caller reuses the destination blocks at once
    await asyncio.sleep(3.0)  # the server goes on sending the rest
    assert bool((cache[dst] == 7.0).all())


async def test_segment_longer_than_the_server_allows_is_refused(fp32_server, client):
    from kvtransfer.ucx_protocol import ServerAddress

    client, cache = client
    addr = ServerAddress.unpack(fp32_server.address)
    lying = ServerAddress(addr.server_id, 8, addr.layout, addr.ucx_address).pack()  # claims 8 blocks a segment
    fp32_server.expose(b"long", [20, 21, 22])
    with pytest.raises(KVTransferError, match=r"BAD_REQUEST.*segment lengths must be 1..2 blocks, got 3..3"):
        await client.pull(lying, b"long", [20, 21, 22], [30, 31, 32], timeout=10)
    assert not cache[[30, 31, 32]].any()


async def test_old_transport_address_is_named(client):
    client, _ = client
    with pytest.raises(KVTransferError, match="not a Tandem UCX KV transport address"):
        await client.pull(b"TKV1" + bytes(40), b"x", [1], [1], timeout=5)


async def test_repeated_destination_blocks_are_refused(fp32_server, client):
    client, _ = client
    with pytest.raises(KVTransferError, match="destination block ids repeat"):
        await client.pull(fp32_server.address, b"x", [1, 2], [5, 5], timeout=5)


async def test_revoked_after_the_last_send_is_not_ok(client, monkeypatch):
    """Every segment went out, but the token was revoked (its blocks freed) while they were being
    read: the bytes may be torn, so the server's final word is ABORTED and the pull fails."""
    import kvtransfer.ucx_server as S

    client, cache = client
    done: list[tuple[bytes, bool]] = []
    server = KVTransportServer(make_cache(torch.float32, 1), segment_bytes=SEGMENT_BYTES, on_pull_done=lambda t, ok: done.append((t, ok)))
    await server.start()
    src, dst = [1, 2, 3, 4, 5], [10, 11, 12, 13, 14]  # three segments
    calls = []

    def revoking(*args):
        calls.append(args)
        if len(calls) == 3:  # the last segment: posted after the validity check, revoked before it is read
            server.revoke(b"torn")
        return S.segment_buffer.__wrapped__(*args)

    revoking.__wrapped__ = S.segment_buffer
    monkeypatch.setattr(S, "segment_buffer", revoking)
    try:
        server.expose(b"torn", src, time.time() + 60, peer_address=client.address)
        with pytest.raises(KVTransferError, match="server aborted the pull: the transfer token was revoked"):
            await client.pull(server.address, b"torn", src, dst, timeout=10)
        assert len(calls) == 3  # every segment was sent
        for _ in range(50):
            if done:
                break
            await asyncio.sleep(0.05)
        assert done == [(b"torn", False)]
    finally:
        await server.close()


async def test_cancelled_pull_leaves_no_receive_into_the_cache(children, client):
    """The caller cancels the pull mid-way (its request was aborted): once the cancellation has
    landed, no receive posted into the cache may still write there."""
    client, cache = client
    _, dst, pull = await start_slow_pull(children, client, b"cancelled", 12, seed=17, slow_send=0.4, timeout=20)
    await asyncio.sleep(0.5)
    pull.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(pull, 20)
    cache[dst] = 7.0
    await asyncio.sleep(3.0)  # the server goes on sending the rest
    assert bool((cache[dst] == 7.0).all())
