"""gRPC keepalive (services/common/keepalive.py), on real grpc.aio servers and channels on loopback.

A short interval (1 s: grpc core never pings more often) keeps these tests to a few seconds each.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.worker_pool import WorkerPool
from protos.tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.config import ServiceConfig
from services.common.keepalive import Keepalive
from services.common.server import GRPC_OPTIONS
from tests.helpers.silent_link import SilentLink

FAST = Keepalive(time_s=1.0, timeout_s=1.0)
IDLE_S = 5.0  # grpc's default server policy answers the 4th ping without data with GOAWAY


class SilentWorker(worker_pb2_grpc.WorkerServicer):
    """Watch sends one event, then nothing until `more` is set: a connection with no data."""

    def __init__(self):
        self.more = asyncio.Event()

    async def Watch(self, request, context):
        yield worker_pb2.WorkerEvent(load=worker_pb2.LoadSnapshot(num_requests_running=1))
        await self.more.wait()
        yield worker_pb2.WorkerEvent(load=worker_pb2.LoadSnapshot(num_requests_running=2))


async def start(options) -> tuple[grpc.aio.Server, SilentWorker, str]:
    server, servicer = grpc.aio.server(options=options), SilentWorker()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


def option(options, name):
    return dict(options).get(name)


def test_clients_ping_idle_connections_and_servers_accept_it():
    ka = Keepalive(time_s=10, timeout_s=5)
    client, server = ka.channel_options(), ka.server_options()
    assert option(client, "grpc.keepalive_time_ms") == 10_000 and option(client, "grpc.keepalive_timeout_ms") == 5_000
    assert option(client, "grpc.http2.ping_timeout_ms") == 5_000  # what grpc 1.85 waits for the ping's ack
    assert option(client, "grpc.keepalive_permit_without_calls") == 1 and option(client, "grpc.http2.max_pings_without_data") == 0
    assert option(server, "grpc.http2.min_ping_interval_without_data_ms") == 5_000  # half the clients' interval
    assert option(server, "grpc.keepalive_permit_without_calls") == 1 and option(server, "grpc.http2.max_ping_strikes") == 2
    assert option(server, "grpc.keepalive_time_ms") == 10_000  # servers notice a vanished client too
    # off: no pings sent, but pings (from services configured otherwise) are still accepted
    assert Keepalive(time_s=0).channel_options() == []
    assert option(Keepalive(time_s=0).server_options(), "grpc.http2.min_ping_interval_without_data_ms") == 5_000
    # the simulated workers' servers accept the default pings as well
    assert option(GRPC_OPTIONS, "grpc.http2.min_ping_interval_without_data_ms") == 5_000


@pytest.mark.parametrize(("field", "value", "message"), [
    ("grpc_keepalive_time", 0.5, "grpc_keepalive_time must be >= 1 second"),
    ("grpc_keepalive_time", -1.0, "grpc_keepalive_time must be >= 1 second"),
    ("grpc_keepalive_timeout", 0.0, "grpc_keepalive_timeout must be > 0"),
])  # fmt: skip
def test_bad_keepalive_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig(role="gateway", **{field: value})
    assert Keepalive.from_config(ServiceConfig(role="gateway", grpc_keepalive_time=0)).time_s == 0


async def test_the_gateways_worker_channels_carry_keepalive(monkeypatch):
    dialed = []
    monkeypatch.setattr("services.common.rotating_channel.dial", lambda *args, **kw: dialed.append(args) or grpc.aio.insecure_channel("127.0.0.1:1"))
    pool = WorkerPool("127.0.0.1:1", "c", keepalive=Keepalive(time_s=7, timeout_s=3))
    await pool._put("k", common_pb2.WorkerRegistration(worker_id="t", role="tokenizer", grpc_address="127.0.0.1:1"))
    try:
        options = dialed[0][3]
        assert option(options, "grpc.keepalive_time_ms") == 7_000 and option(options, "grpc.keepalive_timeout_ms") == 3_000
        assert option(options, "grpc.max_receive_message_length") == 64 * 2**20
    finally:
        await pool._remove("k")


async def watch_through_idle(server_options) -> str:
    """Open a Watch, leave the connection without data for IDLE_S (FAST client pings meanwhile),
    then have the server send again: 'ok', or how the stream failed."""
    server, servicer, address = await start(server_options)
    try:
        async with grpc.aio.insecure_channel(address, options=FAST.channel_options()) as channel:
            await channel.channel_ready()
            await asyncio.sleep(IDLE_S / 2)  # no call at all: pings still flow (permit_without_calls)
            if channel.get_state() != grpc.ChannelConnectivity.READY:
                return f"idle channel went {channel.get_state()}"
            call = worker_pb2_grpc.WorkerStub(channel).Watch(worker_pb2.WatchRequest(), timeout=30)
            await call.read()
            await asyncio.sleep(IDLE_S)  # a call open, no data
            servicer.more.set()
            try:
                event = await call.read()
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"
            return "ok" if event.load.num_requests_running == 2 else f"unexpected {event}"
    finally:
        await server.stop(None)


async def test_servers_accept_the_clients_pings_without_goaway():
    assert await watch_through_idle(FAST.server_options()) == "ok"


async def test_a_server_with_grpcs_default_policy_would_answer_goaway():
    # the control: without the server options, the same client is cut off (so the pings are real)
    outcome = await watch_through_idle([])
    assert "UNAVAILABLE" in outcome and "ping" in outcome.lower(), outcome


async def test_a_call_to_a_silent_peer_fails_unavailable_before_its_deadline():
    server, _, address = await start(FAST.server_options())
    try:
        async with SilentLink(address) as link, grpc.aio.insecure_channel(link.address, options=FAST.channel_options()) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Watch(worker_pb2.WatchRequest(), timeout=20)
            await call.read()
            link.cut()  # the peer goes silent; its socket stays open
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            # UNAVAILABLE from the unanswered ping, not the deadline 20 s away
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    finally:
        await server.stop(None)
