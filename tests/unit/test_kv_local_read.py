"""Same-host pulls that read the server's memory (kvtransfer/local_read.py), between real processes.

The server runs in a spawned child (test_ucx_transport's ServerChild); the client runs here, so a
test can slow or refuse its read by wrapping local_read.read_runs, which the client's worker
thread calls."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from kvtransfer import local_read
from kvtransfer.ucx_protocol import ServerAddress
from kvtransfer.ucx_transport import KVTransferError, KVTransportClient

from . import test_ucx_transport
from .test_ucx_transport import SHAPE, ServerChild, make_cache, random_blocks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 is not installed")

children = test_ucx_transport.children  # spawned peers, killed for sure when the test ends


def start_server(children, **kw) -> ServerChild:
    server = ServerChild(**kw)
    children.append(server)
    return server


@pytest.fixture
async def client():
    """(client, its cache): the default client, which reads locally from a server on its host."""
    cache = make_cache(torch.float32, None)
    c = KVTransportClient(cache)
    await c.start()
    yield c, cache
    await c.close()


@pytest.fixture
def reads(monkeypatch):
    """The calls the client makes to local_read.read_runs, as (pid, number of runs)."""
    calls: list[tuple[int, int]] = []
    real = local_read.read_runs

    def counted(pid, remote, local):
        calls.append((pid, len(remote)))
        return real(pid, remote, local)

    monkeypatch.setattr(local_read, "read_runs", counted)
    return calls


def slow_reads(monkeypatch, seconds: float) -> tuple[threading.Event, threading.Event]:
    """local_read.read_runs, each call started `seconds` late: (a read started, a read ended)."""
    real, started, ended = local_read.read_runs, threading.Event(), threading.Event()

    def slow(pid, remote, local):
        started.set()
        time.sleep(seconds)
        real(pid, remote, local)
        ended.set()

    monkeypatch.setattr(local_read, "read_runs", slow)
    return started, ended


async def test_a_same_host_pull_reads_the_server_s_memory(children, client, reads):
    client, cache = client
    server = start_server(children)
    assert ServerAddress.unpack(server.address).host == local_read.host_identity() != b""
    src, dst = random_blocks(23, seed=5)
    server.expose(b"local-fp32", src)
    assert await client.pull(server.address, b"local-fp32", src, dst, timeout=20) == "local"
    assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
    assert reads == [(server.proc.pid, 23), (server.proc.pid, 1)]  # one read of 23 runs, then the check word; no UCX segment


async def test_a_bf16_local_read_with_consecutive_runs(children, reads):
    server = start_server(children, dtype="bfloat16", seed=2)
    cache = make_cache(torch.bfloat16, None)
    c = KVTransportClient(cache)
    await c.start()
    try:
        src = [3, 4, 5, 6, 40, 41, 9, 63, 0]  # a run consecutive on both sides (4 bf16 blocks: the server's segment) and single blocks
        dst = [10, 11, 12, 13, 14, 2, 3, 60, 61]
        server.expose(b"local-bf16", src)
        await c.pull(server.address, b"local-bf16", src, dst, timeout=20)
        assert torch.equal(cache[dst], make_cache(torch.bfloat16, 2)[src])
        assert not cache[[b for b in range(SHAPE["NB"]) if b not in dst]].any()
        assert reads == [(server.proc.pid, 6), (server.proc.pid, 1)]
    finally:
        await c.close()


async def test_a_refused_read_goes_on_as_ucx_messages_and_so_do_later_pulls(children, client, monkeypatch):
    """Where the kernel refuses process_vm_readv (Yama's ptrace_scope, another user), the pull still
    lands, as UCX messages, and the client stops asking that server for local reads."""
    client, cache = client
    server = start_server(children)
    refused: list[int] = []

    def refuse(pid, remote, local):
        refused.append(pid)
        raise local_read.LocalReadError(errno.EPERM, "process_vm_readv: Operation not permitted")

    monkeypatch.setattr(local_read, "read_runs", refuse)
    for i in range(2):
        src, dst = random_blocks(9, seed=20 + i)
        cache.zero_()
        server.expose(b"refused-%d" % i, src)
        assert await client.pull(server.address, b"refused-%d" % i, src, dst, timeout=20) == "messages"
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])
    assert refused == [server.proc.pid]  # the second pull did not ask


async def test_a_server_without_local_reads_streams(children, client, reads):
    client, cache = client
    server = start_server(children, local_reads=False)
    assert ServerAddress.unpack(server.address).host == b""
    src, dst = random_blocks(5, seed=6)
    server.expose(b"streamed", src)
    assert await client.pull(server.address, b"streamed", src, dst, timeout=20) == "messages"
    assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src]) and reads == []


async def test_a_local_read_request_to_a_server_that_does_not_offer_it_is_refused(children, client, reads):
    client, cache = client
    server = start_server(children, local_reads=False)
    a = ServerAddress.unpack(server.address)
    forged = ServerAddress(a.server_id, a.segment_blocks, a.layout, a.ucx_address, local_read.host_identity()).pack()
    server.expose(b"forged", [1, 2])
    with pytest.raises(KVTransferError, match="BAD_REQUEST.*does not offer local reads"):
        await client.pull(forged, b"forged", [1, 2], [3, 4], timeout=20)
    assert reads == [] and not cache.any()


async def test_revoked_during_the_read_the_pull_fails(children, client, monkeypatch):
    """The lease ended while the client was reading: the blocks may have been reused under the read,
    so the server zeroed the check word, and the pull fails."""
    client, cache = client
    server = start_server(children)
    real = local_read.read_runs

    def revoked_meanwhile(pid, remote, local):
        server.conn.send(("revoke", b"revoked"))
        time.sleep(0.3)  # the server has handled the revoke before the read
        real(pid, remote, local)

    monkeypatch.setattr(local_read, "read_runs", revoked_meanwhile)
    src, dst = random_blocks(6, seed=7)
    server.expose(b"revoked", src)
    with pytest.raises(KVTransferError, match="server aborted the pull: it released the blocks during the read"):
        await client.pull(server.address, b"revoked", src, dst, timeout=20)


async def test_a_cancelled_pull_raises_only_after_its_read_ended(children, client, monkeypatch):
    """The read's thread writes into the cache; the caller frees the destination blocks as soon as
    the pull raises, so the pull must wait the copy out first."""
    client, cache = client
    server = start_server(children)
    started, ended = slow_reads(monkeypatch, 1.0)
    src, dst = random_blocks(4, seed=8)
    server.expose(b"cancelled", src)
    pull = asyncio.ensure_future(client.pull(server.address, b"cancelled", src, dst, timeout=20))
    assert await asyncio.to_thread(started.wait, 20)
    pull.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(pull, 20)
    assert ended.is_set()


async def test_a_timed_out_pull_raises_only_after_its_read_ended(children, client, monkeypatch):
    client, cache = client
    server = start_server(children)
    _, ended = slow_reads(monkeypatch, 2.0)
    src, dst = random_blocks(4, seed=9)
    server.expose(b"timeout", src)
    with pytest.raises(KVTransferError, match="timed out after 0.5 s while reading the blocks from the server's memory"):
        await client.pull(server.address, b"timeout", src, dst, timeout=0.5)
    assert ended.is_set()


async def test_server_killed_before_the_read_then_a_new_server(children, client, monkeypatch):
    client, cache = client
    server = start_server(children)
    real = local_read.read_runs

    def after_the_kill(pid, remote, local):
        server.kill()
        real(pid, remote, local)  # ESRCH: falls back to UCX messages, whose endpoint has failed

    monkeypatch.setattr(local_read, "read_runs", after_the_kill)
    src, dst = random_blocks(4, seed=10)
    server.expose(b"killed", src)
    with pytest.raises(KVTransferError):
        await client.pull(server.address, b"killed", src, dst, timeout=10)
    monkeypatch.setattr(local_read, "read_runs", real)
    again = start_server(children, seed=3)
    again.expose(b"again", src)
    await client.pull(again.address, b"again", src, dst, timeout=20)
    assert torch.equal(cache[dst], make_cache(torch.float32, 3)[src])


async def test_check_words_come_back_after_every_kind_of_pull(monkeypatch):
    """A server and a client in this process (one UCX worker): after pulls that landed, were
    revoked mid-read, were refused by the kernel (over the same-host channel, which the first pull
    brought the key of: that pull fails), or then went as UCX messages, every check word is free
    and zero again, and the server reported each pull's end (ok only for the ones that landed)."""
    from kvtransfer.ucx_transport import KVTransportServer

    done: list[tuple[bytes, bool]] = []
    server = KVTransportServer(make_cache(torch.float32, 1), on_pull_done=lambda t, ok: done.append((t, ok)))
    cache = make_cache(torch.float32, None)
    client = KVTransportClient(cache)
    await server.start()
    await client.start()
    real = local_read.read_runs
    try:
        src, dst = random_blocks(8, seed=12)
        server.expose(b"fine", src, time.time() + 30, peer_address=client.address)
        await client.pull(server.address, b"fine", src, dst, timeout=20)
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])

        def revoke_first(pid, remote, local):
            server.revoke(b"revoked")
            real(pid, remote, local)

        monkeypatch.setattr(local_read, "read_runs", revoke_first)
        server.expose(b"revoked", src, time.time() + 30, peer_address=client.address)
        with pytest.raises(KVTransferError, match="released the blocks during the read"):
            await client.pull(server.address, b"revoked", src, dst, timeout=20)

        def refuse(pid, remote, local):
            raise local_read.LocalReadError(errno.EPERM, "process_vm_readv: Operation not permitted")

        monkeypatch.setattr(local_read, "read_runs", refuse)
        cache.zero_()
        server.expose(b"refused", src, time.time() + 30, peer_address=client.address)
        with pytest.raises(KVTransferError, match="kernel refused"):  # over the same-host channel: no UCX to fall back on
            await client.pull(server.address, b"refused", src, dst, timeout=20)
        server.expose(b"then-streamed", src, time.time() + 30, peer_address=client.address)
        await client.pull(server.address, b"then-streamed", src, dst, timeout=20)
        assert torch.equal(cache[dst], make_cache(torch.float32, 1)[src])

        deadline = time.monotonic() + 10
        while len(done) < 4 and time.monotonic() < deadline:  # on_pull_done hops onto this loop
            await asyncio.sleep(0.01)
        assert sorted(done) == [(b"fine", True), (b"refused", False), (b"revoked", False), (b"then-streamed", True)]
        server.check_integrity()
        assert len(server._free_checks) == len(server._checks)
    finally:
        await client.close()
        await server.close()


# -- local_read on its own ----------------------------------------------------------------------


def test_read_runs_copies_and_names_what_went_wrong():
    src, dst = np.arange(4096, dtype=np.uint8), np.zeros(4096, dtype=np.uint8)
    base, here = src.ctypes.data, dst.ctypes.data
    local_read.read_runs(os.getpid(), [(base + 100, 50), (base, 10)], [(here, 50), (here + 2000, 10)])
    assert (dst[:50] == src[100:150]).all() and (dst[2000:2010] == src[:10]).all() and not dst[50:2000].any()
    with pytest.raises(ValueError, match="remote and local runs differ"):
        local_read.read_runs(os.getpid(), [(base, 10)], [(here, 11)])
    with pytest.raises(local_read.LocalReadError, match="Bad address|not mapped"):
        local_read.read_runs(os.getpid(), [(8, 16)], [(here, 16)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(local_read.LocalReadError, match=f"pid {dead.pid}: No such process"):
        local_read.read_runs(dead.pid, [(base, 16)], [(here, 16)])


def test_read_runs_takes_more_runs_than_one_call_can():
    n = local_read.IOV_MAX + 7
    src, dst = np.random.default_rng(1).integers(0, 255, 2 * n, dtype=np.uint8), np.zeros(2 * n, dtype=np.uint8)
    local_read.read_runs(os.getpid(), [(src.ctypes.data + 2 * i, 2) for i in range(n)], [(dst.ctypes.data + 2 * (n - 1 - i), 2) for i in range(n)])
    assert (dst.reshape(n, 2)[::-1] == src.reshape(n, 2)).all()


@pytest.mark.parametrize(
    ("ucx_tls", "offered"),
    [
        (None, True),
        ("posix,cma,tcp,self", True),
        ("sm,self", True),
        ("all", True),
        ("tcp,self", False),
        ("^tcp", True),
        ("^cma,tcp", False),
        ("^sm", False),
        ("^all", False),
    ],
)
def test_local_reads_are_offered_where_ucx_would_use_cma(ucx_tls, offered):
    assert local_read.offered({} if ucx_tls is None else {"UCX_TLS": ucx_tls}) is offered


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1) for namespaces")
def test_another_pid_namespace_is_another_host_and_a_network_namespace_is_not():
    """A pod (its own pid namespace) is another host; containers sharing the pid namespace (the
    compose file's workers) are one, whatever their network namespaces: CMA works between them."""
    probe = "from kvtransfer import local_read; print(local_read.host_identity().hex())"
    run = lambda *pre: subprocess.run(
        [*pre, sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True, cwd=os.getcwd()
    ).stdout.strip()  # noqa: E731
    here, other_pidns, other_netns = run(), run("unshare", "--pid", "--fork"), run("unshare", "--net")
    assert len(here) == 2 * local_read.HOST_ID_BYTES == len(other_pidns)
    assert here == local_read.host_identity().hex() == other_netns
    assert other_pidns != here and other_pidns[:32] == here[:32]  # the same boot id
