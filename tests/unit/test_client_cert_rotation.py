"""The gateway's channels follow a rotated client certificate (services/common/rotating_channel.py)
without dropping in-flight calls: a real grpc.aio mTLS server on loopback sees which certificate
(its serial number) each call presented.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import pytest
from cryptography import x509

from gateway.worker_pool import WorkerHandle
from protos.tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common import rotating_channel
from services.common.tls import TlsFiles, server_credentials
from tandem import certs
from tests.helpers.waiting import eventually


def peer_serial(context) -> int:
    pem = context.auth_context()["x509_pem_cert"][0]
    return x509.load_pem_x509_certificate(pem).serial_number


class RecordingDecode(worker_pb2_grpc.DecodeServicer, worker_pb2_grpc.WorkerServicer):
    """Generate streams one chunk, waits for `finish`, then the last; every call records the serial
    number of the client certificate it came with."""

    def __init__(self):
        self.generate_serials: list[int] = []
        self.watch_serials: list[int] = []
        self.finish = asyncio.Event()

    async def Generate(self, request, context):
        self.generate_serials.append(peer_serial(context))
        yield common_pb2.GenerateResponse(request_id=request.request_id, token_ids=[1])
        if request.request_id == "long":
            await self.finish.wait()
        yield common_pb2.GenerateResponse(request_id=request.request_id, token_ids=[2])

    async def Watch(self, request, context):
        self.watch_serials.append(peer_serial(context))
        yield worker_pb2.WorkerEvent(load=worker_pb2.LoadSnapshot(num_requests_running=0))
        await asyncio.Event().wait()  # open until the client leaves


def serial_of(path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
async def cluster(tmp_path_factory):
    d = certs.create(tmp_path_factory.mktemp("rotation"), roles=("gateway", "decode"))
    servicer = RecordingDecode()
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    decode = certs.role_files(d, "decode")
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsFiles(str(decode.cert), str(decode.key), str(certs.ca_file(d))), True))
    await server.start()
    gateway = certs.role_files(d, "gateway")
    tls = TlsFiles(str(gateway.cert), str(gateway.key), str(certs.ca_file(d)))
    handle = WorkerHandle("k", common_pb2.WorkerRegistration(worker_id="d", role="decode", grpc_address=f"127.0.0.1:{port}"), tls=tls)
    yield d, servicer, handle
    await handle.retire()
    await server.stop(None)


async def collect(call) -> list[int]:
    return [t async for chunk in call for t in chunk.token_ids]


def rotate_gateway_cert(d, key_only: bool = False) -> None:
    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    ca_cert, ca_key = certs.load_ca(d)
    if key_only:  # a rotation caught half-written: the new key is there, its certificate not yet
        scratch = d / "scratch"
        scratch.mkdir(exist_ok=True)
        new = certs.write_role_cert(scratch, ca_cert, ca_key, "gateway")
        shutil.copyfile(new.key, certs.role_files(d, "gateway").key)
        return
    certs.write_role_cert(d, ca_cert, ca_key, "gateway")


async def test_new_calls_present_the_rotated_certificate_and_in_flight_ones_finish(cluster, monkeypatch):
    d, servicer, handle = cluster
    monkeypatch.setattr(rotating_channel, "CHECK_INTERVAL_S", 0.0)  # check on every call (1 s in production)
    old_serial = serial_of(certs.role_files(d, "gateway").cert)
    await eventually(lambda: handle.connected, "the Watch stream", timeout=10)
    assert servicer.watch_serials == [old_serial]

    in_flight = handle.decode_stub().Generate(worker_pb2.WorkerGenerateRequest(request_id="long"), timeout=30)
    assert (await in_flight.read()).token_ids == [1]
    old_channel = handle.channels.current()

    rotate_gateway_cert(d)
    new_serial = serial_of(certs.role_files(d, "gateway").cert)
    assert new_serial != old_serial
    assert await collect(handle.decode_stub().Generate(worker_pb2.WorkerGenerateRequest(request_id="new"), timeout=10)) == [1, 2]
    assert servicer.generate_serials == [old_serial, new_serial]
    assert handle.channels.num_rotations == 1 and handle.channels.current() is not old_channel
    # the Watch stream moved to the new channel (resubscribed), so the old one can close
    await eventually(lambda: servicer.watch_serials[-1:] == [new_serial], "the Watch stream on the new certificate", timeout=10)

    # the call that was in flight across the rotation completes on its old connection
    servicer.finish.set()
    assert [t async for chunk in in_flight for t in chunk.token_ids] == [2]
    assert await in_flight.code() == grpc.StatusCode.OK
    # ...after which the replaced channel closes
    await eventually(lambda: not handle.channels._retiring, "the replaced channel to close", timeout=10)


async def test_a_half_written_rotation_keeps_the_current_certificate(cluster, monkeypatch):
    d, servicer, handle = cluster
    monkeypatch.setattr(rotating_channel, "CHECK_INTERVAL_S", 0.0)
    old_serial = serial_of(certs.role_files(d, "gateway").cert)
    rotate_gateway_cert(d, key_only=True)
    # the key no longer matches the certificate: no new channel, calls keep working
    assert await collect(handle.decode_stub().Generate(worker_pb2.WorkerGenerateRequest(request_id="a"), timeout=10)) == [1, 2]
    assert handle.channels.num_rotations == 0 and servicer.generate_serials == [old_serial]
    rotate_gateway_cert(d)  # the rotation completes
    new_serial = serial_of(certs.role_files(d, "gateway").cert)
    assert await collect(handle.decode_stub().Generate(worker_pb2.WorkerGenerateRequest(request_id="b"), timeout=10)) == [1, 2]
    assert handle.channels.num_rotations == 1 and servicer.generate_serials == [old_serial, new_serial]


async def test_the_files_are_looked_at_once_a_second_at_most(cluster, monkeypatch):
    _, _, handle = cluster
    stats = []
    real = TlsFiles.fingerprint
    monkeypatch.setattr(TlsFiles, "fingerprint", lambda self: stats.append(1) or real(self))
    for _ in range(100):
        handle.channels.current()
    assert len(stats) <= 1
