"""What the UCX data plane exposes: it listens only on the service's interface, and a request
without a live token is dropped without the server ever dialing the address it names."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvtransfer.ucx_runtime import ucx_options
from kvtransfer.ucx_transport import KVTransferError, KVTransportClient, KVTransportServer
from tests.unit.test_ucx_transport import make_cache


def test_ucx_network_devices_follow_the_bind_host():
    assert ucx_options({}, "127.0.0.1")["NET_DEVICES"] == "lo"
    assert ucx_options({}, "localhost")["NET_DEVICES"] == "lo"
    assert "NET_DEVICES" not in ucx_options({}, "0.0.0.0")  # bound to every interface: UCX too
    assert "NET_DEVICES" not in ucx_options({"UCX_NET_DEVICES": "eth1"}, "127.0.0.1")  # the operator's choice wins


def test_a_loopback_worker_has_no_ucx_listener_on_other_interfaces():
    code = textwrap.dedent("""
        import asyncio, os, subprocess, torch
        from kvtransfer import ucx_runtime
        ucx_runtime.set_data_plane_host("127.0.0.1")
        from kvtransfer.ucx_transport import KVTransportServer
        async def main():
            s = KVTransportServer(torch.zeros(8, 2, 2, 2, 16, 32))
            await s.start()
            print(os.getpid())
            print(subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout)
            await s.close()
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]

    pid, _, table = out.stdout.partition("\n")
    listeners = [line.split()[3] for line in table.splitlines() if re.search(rf"pid={pid.strip()},", line)]
    assert listeners, out.stdout
    assert all(addr.startswith("127.0.0.1:") for addr in listeners), listeners


async def test_an_unknown_token_is_dropped_unanswered_and_the_real_one_still_works():
    server = KVTransportServer(make_cache(torch.float32, 1))
    await server.start()
    cache = make_cache(torch.float32, None)
    client = KVTransportClient(cache)
    await client.start()
    try:
        server.expose(b"real", [1], time.time() + 30, peer_address=client.address)
        with pytest.raises(KVTransferError, match="timed out"):
            await client.pull(server.address, b"forged", [1], [1], timeout=1.0)
        assert server.dropped == 1
        await client.pull(server.address, b"real", [1], [2], timeout=10)
        assert torch.equal(cache[2], make_cache(torch.float32, 1)[1])
    finally:
        await client.close()
        await server.close()
