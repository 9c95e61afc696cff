"""The same-host channel (kvtransfer/local_channel.py): after a first local read requested over UCX,
a client asks a server on its host for later ones over a Unix socket, proven with the key that
first answer carried. Servers run in spawned children (test_ucx_transport's ServerChild) or, where
a test needs to see the server's state, in this process (the client then shares its UCX worker)."""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import struct
import time

import numpy as np
import pytest
import torch

from kvtransfer import local_channel, local_read, ucx_client
from kvtransfer.ucx_protocol import PullRequest, PullResponse, ServerAddress, Status
from kvtransfer.ucx_transport import KVTransferError, KVTransportClient, KVTransportServer

from . import test_kv_local_read
from .test_kv_local_read import slow_reads, start_server
from .test_ucx_transport import ClientChild, make_cache, random_blocks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 is not installed")

children, client = test_kv_local_read.children, test_kv_local_read.client  # the same fixtures: spawned peers, the default client


@pytest.fixture
def endpoints(monkeypatch):
    """How many UCX endpoints this process's clients create (a channel pull creates none)."""
    made: list[bytes] = []
    real = ucx_client.TaggedEndpoint

    def counted(rt, address):
        made.append(address)
        return real(rt, address)

    monkeypatch.setattr(ucx_client, "TaggedEndpoint", counted)
    return made


@pytest.fixture
async def pair(request):
    """(server, client, client's cache, the pulls the server reported done) in this process; the
    server's pull slots: 2, or the test's indirect parameter."""
    done: list[tuple[bytes, bool]] = []
    slots = getattr(request, "param", 2)
    server = KVTransportServer(make_cache(torch.float32, 1), on_pull_done=lambda t, ok: done.append((t, ok)), max_concurrent_pulls=slots)
    cache = make_cache(torch.float32, None)
    c = KVTransportClient(cache)
    await server.start()
    await c.start()
    yield server, c, cache, done
    await c.close()
    await server.close()


async def pull_fresh(server, client, cache, token: bytes, n: int, seed: int, **kw) -> str:
    """Expose n scattered blocks to this client and pull them into a zeroed cache; checks the bytes."""
    src, dst = random_blocks(n, seed=seed)
    cache.zero_()
    server.expose(token, src, time.time() + 30, peer_address=client.address)
    path = await client.pull(server.address, token, src, dst, timeout=kw.get("timeout", 20))
    assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
    return path


async def settled(done: list, count: int) -> list:
    """on_pull_done hops onto this loop: wait (bounded) until `count` pulls were reported."""
    deadline = time.monotonic() + 10
    while len(done) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return sorted(done)


async def raw_connection(address: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    name = ServerAddress.unpack(address).channel
    assert name
    return await asyncio.open_unix_connection(sock=local_channel.connected_socket(name))


async def test_after_the_first_local_read_pulls_go_over_the_channel_without_ucx_endpoints(children, client, endpoints):
    client, cache = client
    server = start_server(children)
    assert ServerAddress.unpack(server.address).channel.startswith(b"tandem-kv-%d-" % server.proc.pid)
    for i in range(4):
        src, dst = random_blocks(9, seed=30 + i)
        cache.zero_()
        server.expose(b"chan-%d" % i, src)
        assert await client.pull(server.address, b"chan-%d" % i, src, dst, timeout=20) == "local"
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
    assert len(endpoints) == 1 and client.channel_pulls == 3  # the first pull over UCX (it brings the key), then the channel


async def test_concurrent_channel_pulls_each_take_a_connection_and_keep_it(pair):
    server, client, cache, done = pair
    await pull_fresh(server, client, cache, b"first", 3, seed=40)
    jobs = []
    for i in range(6):  # disjoint destinations: six pulls at once into one cache
        src = random_blocks(8, seed=41 + i)[0]
        dst = list(range(8 * i, 8 * i + 8))
        server.expose(b"many-%d" % i, src, time.time() + 30, peer_address=client.address)
        jobs.append((src, dst, client.pull(server.address, b"many-%d" % i, src, dst, timeout=20)))
    cache.zero_()
    assert await asyncio.gather(*(j for _, _, j in jobs)) == ["local"] * 6
    for src, dst, _ in jobs:
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
    assert client.channel_pulls == 6 == server.channel_pulls
    assert 1 <= client._channels.idle_connections(ServerAddress.unpack(server.address).channel) <= 6
    assert await settled(done, 7) == sorted([(b"first", True)] + [(b"many-%d" % i, True) for i in range(6)])
    server.check_integrity()
    assert len(server._free_checks) == len(server._checks)


async def test_a_wrong_key_or_garbage_is_refused_and_the_server_goes_on(pair):
    server, client, cache, _ = pair
    reader, writer = await raw_connection(server.address)
    local_channel.write_frame(writer, local_channel.Hello(client.address, bytes(local_channel.KEY_BYTES)).pack())
    answer = PullResponse.unpack(await asyncio.wait_for(local_channel.read_frame(reader), 10))
    assert answer.status is Status.BAD_REQUEST and "unknown channel key" in answer.message
    assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection is closed
    writer.close()
    reader, writer = await raw_connection(server.address)
    writer.write(struct.pack("<I", 1 << 30))  # a length beyond any message
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert await pull_fresh(server, client, cache, b"after", 4, seed=50) == "local"
    assert await pull_fresh(server, client, cache, b"after-2", 4, seed=51) == "local" and client.channel_pulls == 1


async def test_a_hello_larger_than_any_hello_is_refused_before_its_body(pair):
    """An unproven connection may make the server read one hello at most (MAX_HELLO_BYTES), not a
    request-sized frame: the length alone closes it, well before the hello timeout would."""
    server, *_ = pair
    reader, writer = await raw_connection(server.address)
    writer.write(struct.pack("<I", local_channel.MAX_HELLO_BYTES + 1))  # under MAX_REQUEST_BYTES; no body follows
    assert await asyncio.wait_for(reader.read(), local_channel.HELLO_TIMEOUT / 2) == b""
    writer.close()


async def test_a_connection_that_never_says_hello_is_closed(pair):
    server, *_ = pair
    reader, writer = await raw_connection(server.address)
    t = time.monotonic()
    assert await asyncio.wait_for(reader.read(), local_channel.HELLO_TIMEOUT + 10) == b""
    assert time.monotonic() - t >= local_channel.HELLO_TIMEOUT - 0.5
    writer.close()


async def test_a_key_proves_one_address_only(pair):
    """A connection greeted for one UCX address may not request as another (closed unanswered), and
    a token bound to another client is refused on it: the tokens' peer binding holds."""
    server, client, cache, done = pair
    await pull_fresh(server, client, cache, b"key", 2, seed=60)
    addr = ServerAddress.unpack(server.address)
    other = b"another client's UCX address"
    server.expose(b"theirs", [1], time.time() + 30, peer_address=other)

    def request(as_address: bytes) -> bytes:
        return PullRequest(secrets.randbits(44), 10.0, b"theirs", as_address, addr.layout, np.asarray([[1, 1]], np.int64), local_read=True).pack()

    async def probe() -> tuple[bytes, bytes]:  # on the UCX loop, where the client's connections live
        conn = await client._channels.take(addr.channel, client.address)
        try:
            conn.send(request(client.address))
            refused = await asyncio.wait_for(conn.receive(), 10)
            conn.send(request(other))
            with pytest.raises(asyncio.IncompleteReadError):
                await asyncio.wait_for(conn.receive(), 10)
            return refused
        finally:
            conn.close()

    assert PullResponse.unpack(await client._rt.run(probe)).status is Status.WRONG_PEER
    assert await settled(done, 1) == [(b"key", True)]  # "theirs" was never served, nor burnt
    assert not server._grants[b"theirs"].used


async def test_a_stolen_token_is_refused_on_the_channel_and_the_real_peer_still_pulls(children, client):
    client, cache = client
    server = start_server(children)
    src, dst = random_blocks(5, seed=70)
    server.expose(b"mine", src)
    await client.pull(server.address, b"mine", src, dst, timeout=20)  # the key
    peer = ClientChild(server.address, b"stolen", src, dst)
    children.append(peer)
    server.expose(b"stolen", src, peer=peer.address)
    with pytest.raises(KVTransferError, match="WRONG_PEER"):
        await client.pull(server.address, b"stolen", src, dst, timeout=20)
    peer.go()
    assert await asyncio.to_thread(peer.conn.recv) == ("ok", True)


async def test_revoked_during_a_channel_read_the_pull_fails_and_every_check_word_comes_back(pair, monkeypatch):
    server, client, cache, done = pair
    await pull_fresh(server, client, cache, b"key", 2, seed=80)
    real = local_read.read_runs

    def revoke_first(pid, remote, local):
        server.revoke(b"revoked")
        real(pid, remote, local)

    monkeypatch.setattr(local_read, "read_runs", revoke_first)
    src, dst = random_blocks(6, seed=81)
    server.expose(b"revoked", src, time.time() + 30, peer_address=client.address)
    with pytest.raises(KVTransferError, match="released the blocks during the read"):
        await client.pull(server.address, b"revoked", src, dst, timeout=20)
    monkeypatch.setattr(local_read, "read_runs", real)
    assert await pull_fresh(server, client, cache, b"after", 3, seed=82) == "local"  # the connection was kept
    assert client.channel_pulls == 2 == server.channel_pulls
    assert await settled(done, 3) == [(b"after", True), (b"key", True), (b"revoked", False)]
    server.check_integrity()
    assert len(server._free_checks) == len(server._checks)


async def test_a_timed_out_channel_pull_raises_after_its_read_and_the_server_lets_the_blocks_go(pair, monkeypatch):
    server, client, cache, done = pair
    await pull_fresh(server, client, cache, b"key", 2, seed=90)
    _, ended = slow_reads(monkeypatch, 1.5)
    src, dst = random_blocks(4, seed=91)
    server.expose(b"slow", src, time.time() + 30, peer_address=client.address)
    with pytest.raises(KVTransferError, match="timed out after 0.5 s while reading the blocks"):
        await client.pull(server.address, b"slow", src, dst, timeout=0.5)
    assert ended.is_set()
    assert await settled(done, 2) == [(b"key", True), (b"slow", False)]  # the connection closed: the pull ended
    server.check_integrity()


async def test_server_killed_with_idle_connections_fails_the_next_pull_at_once_then_a_new_server(children, client):
    client, cache = client
    server = start_server(children)
    for i in range(2):
        src, dst = random_blocks(3, seed=100 + i)
        server.expose(b"before-%d" % i, src)
        await client.pull(server.address, b"before-%d" % i, src, dst, timeout=20)
    server.expose(b"dead", [1, 2])
    server.kill()
    t = time.monotonic()
    with pytest.raises(KVTransferError, match="channel broken|server gone"):
        await client.pull(server.address, b"dead", [1, 2], [3, 4], timeout=20)
    assert time.monotonic() - t < 5
    again = start_server(children, seed=3)
    src, dst = random_blocks(5, seed=103)
    again.expose(b"again", src)
    assert await client.pull(again.address, b"again", src, dst, timeout=20) == "local"
    assert torch.equal(cache[dst], make_cache(torch.float32, 3)[src])


async def test_idle_connections_to_a_dead_server_are_dropped_on_the_next_pull_anywhere(children, client):
    """A decode worker whose prefill peers come and go keeps no socket to the dead ones."""
    client, cache = client
    gone, stays = start_server(children), start_server(children, seed=3)
    for server, seed in ((gone, 110), (gone, 111), (stays, 112)):
        src, dst = random_blocks(3, seed=seed)
        server.expose(b"t-%d" % seed, src)
        await client.pull(server.address, b"t-%d" % seed, src, dst, timeout=20)
    gone_name = ServerAddress.unpack(gone.address).channel
    assert client._channels.idle_connections(gone_name) == 1 and client._channels.knows(gone_name)
    (conn,) = client._channels._idle[gone_name]
    gone.kill()
    deadline = time.monotonic() + 10
    while conn.usable and time.monotonic() < deadline:  # until the UCX loop has seen the server's end of it
        await asyncio.sleep(0.02)
    src, dst = random_blocks(3, seed=113)
    stays.expose(b"after", src)
    assert await client.pull(stays.address, b"after", src, dst, timeout=20) == "local"
    assert client._channels.idle_connections(gone_name) == 0 and not client._channels.knows(gone_name)
    assert client._channels.idle_connections(ServerAddress.unpack(stays.address).channel) == 1


async def test_a_channel_out_of_reach_is_tried_once_then_pulls_are_requested_over_ucx(children, client, endpoints):
    """Containers with their own network namespaces share no abstract sockets: the key comes, the
    connection fails, and local reads go on as UCX requests, without trying again."""
    client, cache = client
    server = start_server(children)
    a = ServerAddress.unpack(server.address)
    elsewhere = ServerAddress(a.server_id, a.segment_blocks, a.layout, a.ucx_address, a.host, b"tandem-kv-nowhere").pack()
    for i in range(3):
        src, dst = random_blocks(4, seed=110 + i)
        cache.zero_()
        server.expose(b"far-%d" % i, src)
        assert await client.pull(elsewhere, b"far-%d" % i, src, dst, timeout=20) == "local"
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
    assert len(endpoints) == 3 and client.channel_pulls == 0
    assert not client._channels.knows(b"tandem-kv-nowhere")


@pytest.mark.parametrize("pair", [1], indirect=True)  # one pull slot: a cap of 4 connections
async def test_a_full_channel_sends_pulls_over_ucx(pair, endpoints):
    """Connections beyond the server's cap are closed at once; the pull goes as a UCX request."""
    server, c, cache, _ = pair
    idle = []
    try:
        await pull_fresh(server, c, cache, b"key", 2, seed=120)
        for _ in range(4):  # MAX_PENDING_FACTOR x 1 slot: the cap, held by connections that never say hello
            idle.append(await raw_connection(server.address))
        assert await pull_fresh(server, c, cache, b"full", 3, seed=121) == "local"
        assert c.channel_pulls == 0 and len(endpoints) == 2
        for reader, _ in idle:  # the hello timeout frees the cap
            assert await asyncio.wait_for(reader.read(), local_channel.HELLO_TIMEOUT + 10) == b""
        assert await pull_fresh(server, c, cache, b"freed", 3, seed=122) == "local"
        assert c.channel_pulls == 1 and len(endpoints) == 2
    finally:
        for _, writer in idle:
            writer.close()


async def test_closing_the_server_closes_its_connections(pair):
    server, client, cache, _ = pair
    await pull_fresh(server, client, cache, b"one", 2, seed=130)
    await pull_fresh(server, client, cache, b"two", 2, seed=131)
    name = ServerAddress.unpack(server.address).channel
    assert client._channels.idle_connections(name) == 1
    await asyncio.wait_for(server.close(), 15)
    server.expose(b"late", [1], time.time() + 30, peer_address=client.address)  # unknown to a closed server anyway
    with pytest.raises(KVTransferError):
        await client.pull(server.address, b"late", [1], [2], timeout=3)
    with pytest.raises(ConnectionRefusedError):
        local_channel.connected_socket(name)


# -- wire formats ------------------------------------------------------------------------------


def test_hello_and_keys():
    secret = bytes(range(32))
    key = local_channel.channel_key(secret, b"addr-a")
    assert len(key) == local_channel.KEY_BYTES and key != local_channel.channel_key(secret, b"addr-b")
    assert key != local_channel.channel_key(bytes(32), b"addr-a")
    hello = local_channel.Hello(b"addr-a", key)
    assert local_channel.Hello.unpack(hello.pack()) == hello
    with pytest.raises(ValueError, match="length"):
        local_channel.Hello.unpack(hello.pack() + b"x")
    with pytest.raises(ValueError, match="magic"):
        local_channel.Hello.unpack(b"XXXX" + hello.pack()[4:])


def test_the_address_and_answer_carry_the_channel():
    from kvtransfer.ucx_protocol import Layout

    layout = Layout(2, 2, 16, 64, 4, "float32")
    a = ServerAddress(5, 8, layout, b"ucx", local_read.host_identity(), b"tandem-kv-1-00000005-abcd")
    assert ServerAddress.unpack(a.pack()) == a
    r = PullResponse(Status.OK, "", 12, 34, 56, b"k" * 16)
    assert PullResponse.unpack(r.pack()) == r
    assert PullResponse.unpack(PullResponse(Status.ABORTED, "why").pack()).channel_key == b""


def test_channels_keep_few_servers_and_idle_connections():
    ch = local_channel.Channels(max_servers=2, max_idle=1)
    for name in (b"a", b"b", b"c"):
        ch.learn(name, b"k" * local_channel.KEY_BYTES)
    assert not ch.knows(b"a") and ch.knows(b"b") and ch.knows(b"c")
    ch.learn(b"d", b"short")  # not a key
    assert not ch.knows(b"d")


async def test_channel_pulls_cancelled_revoked_and_landed_at_random_leave_nothing_behind(pair):
    """Four loops at once, each pulling 10 grants over the channel; some pulls are cancelled at a random
    moment, some grants revoked first. Every other pull lands with the right bytes; afterwards every
    grant was reported done exactly once, every check word is free and zero, and the server's pull
    slots are all free (a later pull of each loop still lands)."""
    import random

    server, client, cache, done = pair
    await pull_fresh(server, client, cache, b"key", 2, seed=140)
    rng = random.Random(7)
    outcomes: dict[bytes, str] = {}

    async def loop(k: int) -> None:
        dst_all = list(range(16 * k, 16 * k + 16))  # this loop's own destination blocks
        for i in range(10):
            token = b"l%d-%d" % (k, i)
            src = random_blocks(8, seed=1000 + 10 * k + i)[0]
            dst = dst_all[:8] if i % 2 else dst_all[8:]
            server.expose(token, src, time.time() + 30, peer_address=client.address)
            what = rng.choice(["land", "land", "cancel", "revoke"])
            if what == "revoke":
                server.revoke(token)
            pull = asyncio.ensure_future(client.pull(server.address, token, src, dst, timeout=20))
            if what == "cancel":
                await asyncio.sleep(rng.uniform(0, 0.004))
                pull.cancel()
            try:
                await pull
                outcomes[token] = "landed"
                assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
            except asyncio.CancelledError:
                outcomes[token] = "cancelled"
            except KVTransferError:
                outcomes[token] = "failed"
        await pull_fresh_into(server, client, cache, b"after-%d" % k, dst_all[:4], seed=2000 + k)

    async def pull_fresh_into(server, client, cache, token, dst, seed):
        src = random_blocks(len(dst), seed=seed)[0]
        server.expose(token, src, time.time() + 30, peer_address=client.address)
        assert await client.pull(server.address, token, src, dst, timeout=20) == "local"
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])

    await asyncio.wait_for(asyncio.gather(*(loop(k) for k in range(4))), 120)
    landed = {t for t, o in outcomes.items() if o == "landed"}
    assert landed and "cancelled" in outcomes.values()
    deadline = time.monotonic() + 10
    while (len(server._free_checks) < len(server._checks) or len(done) < 1 + 4 + len(landed)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # cancelled pulls end on the server once it sees their connection close
    await asyncio.sleep(0.2)  # and a report still on its way would show up as a duplicate below
    tokens = [t for t, _ in done]
    assert len(tokens) == len(set(tokens)), "a pull reported done twice"
    # a pull cancelled after its read (its note sent) ends OK on the server: the caller just drops the blocks
    cancelled = {t for t, o in outcomes.items() if o == "cancelled"}
    assert {t for t, ok in done if ok} - cancelled == landed | {b"key"} | {b"after-%d" % k for k in range(4)}
    server.check_integrity()
    assert len(server._free_checks) == len(server._checks) and not server._checks.any()
