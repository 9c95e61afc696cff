"""A transfer token is bound to the decode worker it was issued for (issue 14, item 5).

The server under test runs in this process; the real decode worker is this process's client (the
UCX runtime is a per-process singleton, so its address is the process's); the thief is a client in
a spawned process with its own UCX worker, holding the stolen token. Every address the server
dials goes through `kvtransfer.ucx_server.ucx_address`, which the tests record.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time

import pytest
import torch

from kvtransfer import ucx_server
from kvtransfer.ucx_transport import KVTransferError, KVTransportClient, KVTransportServer
from tests.unit import test_ucx_transport
from tests.unit.test_ucx_transport import ClientChild, arecv, make_cache

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 is not installed")


children = test_ucx_transport.children  # spawned peers (the thieves here), killed for sure when the test ends


@pytest.fixture
async def pair(monkeypatch):
    """(server, the real client, its cache, addresses the server dialed, pulls done, drops counted)."""
    dialed: list[bytes] = []
    real_endpoint = ucx_server.TaggedEndpoint  # every endpoint the server opens is made here
    monkeypatch.setattr(ucx_server, "TaggedEndpoint", lambda rt, address: (dialed.append(bytes(address)), real_endpoint(rt, address))[1])
    done: list[tuple[bytes, bool]] = []
    drops: list[int] = []
    server = KVTransportServer(make_cache(torch.float32, 1), on_pull_done=lambda t, ok: done.append((t, ok)), on_drop=lambda: drops.append(1))
    await server.start()
    cache = make_cache(torch.float32, None)
    client = KVTransportClient(cache)
    await client.start()
    try:
        yield server, client, cache, dialed, done, drops
    finally:
        await client.close()
        await server.close()


async def test_expose_requires_the_peer_it_is_for(pair):
    server = pair[0]
    with pytest.raises(TypeError):
        server.expose(b"unbound", [1], time.time() + 30)  # no default: an unbound grant cannot be made
    with pytest.raises(ValueError, match="peer_address"):
        server.expose(b"unbound", [1], time.time() + 30, peer_address=b"")


async def test_a_stolen_token_from_another_peer_is_dropped_undialed_and_the_real_pull_still_works(pair, children):
    server, client, cache, dialed, done, drops = pair
    src = [3, 4, 5]
    thief = ClientChild(server.address, b"stolen", src, src, timeout=1.5)
    children.append(thief)
    assert thief.address != client.address  # two UCX workers: two identities
    server.expose(b"stolen", src, time.time() + 30, peer_address=client.address)

    thief.go()
    kind, message = await arecv(thief.conn)
    assert kind == "error" and "waiting for the server's answer" in message, message  # no answer: not even a refusal
    assert thief.address not in dialed, "the server dialed the address a stolen token presented"
    assert server.dropped == 1 and drops == [1]
    assert done == [], "a refused pull must not end the lease"

    await client.pull(server.address, b"stolen", src, [10, 11, 12], timeout=10)  # the token was not burnt
    assert torch.equal(cache[[10, 11, 12]], make_cache(torch.float32, 1)[src])
    deadline = time.monotonic() + 10  # a same-host pull ends on the server when the client's note arrives
    while not done and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert done == [(b"stolen", True)]
    assert set(dialed) == {client.address}


async def test_a_replayed_token_is_refused_to_its_peer_and_dropped_for_anyone_else(pair, children):
    server, client, _, dialed, _, _ = pair
    server.expose(b"once", [7], time.time() + 30, peer_address=client.address)
    await client.pull(server.address, b"once", [7], [7], timeout=10)
    with pytest.raises(KVTransferError, match="already used"):  # its own peer is told why
        await client.pull(server.address, b"once", [7], [8], timeout=10)
    thief = ClientChild(server.address, b"once", [7], [7], timeout=1.5)
    children.append(thief)
    thief.go()
    kind, message = await arecv(thief.conn)
    assert kind == "error" and "waiting for the server's answer" in message, message
    assert thief.address not in dialed and server.dropped == 1


async def test_a_token_bound_to_another_peer_cannot_pull_from_this_one(pair):
    # the decode leg moved the request: the handle names the first decode worker, not this one
    server, client, cache, dialed, done, _ = pair
    server.expose(b"elsewhere", [2], time.time() + 30, peer_address=b"another decode worker's UCX address")
    with pytest.raises(KVTransferError, match="timed out after 1.0 s while waiting for the server's answer"):
        await client.pull(server.address, b"elsewhere", [2], [2], timeout=1.0)
    assert not cache[2].any() and server.dropped == 1 and dialed == [] and done == []


def test_a_pull_never_outlives_its_grant():
    # a thief that names the bound peer's address gets no data (it goes to that peer, which never
    # asked for it); the server's sends then hang unmatched, so its deadline is the lease's, not the
    # hour the request may name
    grant = ucx_server._Grant(frozenset({1}), time.time() + 5.0, b"peer")
    assert ucx_server._bounded(3600.0, grant) <= 5.0 + ucx_server._SHORT_SEND_TIMEOUT
    assert ucx_server._bounded(1.0, grant) == 1.0  # a shorter client timeout still wins
    assert ucx_server._bounded(-1.0) == 3600.0  # garbage, no grant: the old cap
