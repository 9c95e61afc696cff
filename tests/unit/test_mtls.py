"""mTLS between services and per-RPC role authorization, on a real grpc.aio server on loopback.

The server is built as services/common/server.py builds it with TLS on (tls.py credentials, the
PeerRoleInterceptor); the certificates come from tandem/certs.py.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import time

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from protos.tandem.v1 import tokenizer_pb2, tokenizer_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.config import ServiceConfig
from services.common.errors import ErrorStatusInterceptor
from services.common.peer_roles import PeerRoleInterceptor, allowed_roles, denial, roles_of
from services.common.tls import TlsFiles, dial, server_credentials
from tandem import certs


class Tokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    async def GetInfo(self, request, context):
        return tokenizer_pb2.TokenizerInfo(model="m")


class Prefill(worker_pb2_grpc.PrefillServicer):
    async def ReleaseKV(self, request, context):
        return worker_pb2.ReleaseKVResponse(released=True)


class Worker(worker_pb2_grpc.WorkerServicer):
    async def Watch(self, request, context):
        yield worker_pb2.WorkerEvent()


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    return certs.create(tmp_path_factory.mktemp("certs"))


def files(d, role: str) -> TlsFiles:
    f = certs.role_files(d, role)
    return TlsFiles(str(f.cert), str(f.key), str(certs.ca_file(d)))


async def start_server(tls: TlsFiles, require_client_auth: bool = True):
    srv = grpc.aio.server(interceptors=[PeerRoleInterceptor(), ErrorStatusInterceptor()])
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(Tokenizer(), srv)
    worker_pb2_grpc.add_PrefillServicer_to_server(Prefill(), srv)
    worker_pb2_grpc.add_WorkerServicer_to_server(Worker(), srv)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, srv)
    port = srv.add_secure_port("127.0.0.1:0", server_credentials(tls, require_client_auth))
    await srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.fixture
async def prefill_server(cert_dir):
    srv, address = await start_server(files(cert_dir, "prefill"))
    yield address
    await srv.stop(None)


async def get_info(channel):
    return await tokenizer_pb2_grpc.TokenizerStub(channel).GetInfo(tokenizer_pb2.GetInfoRequest(), timeout=5)


async def release(channel):
    return await worker_pb2_grpc.PrefillStub(channel).ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="r"), timeout=5)


def test_certs_name_the_role_and_keys_are_private(cert_dir):
    for role in certs.CERT_ROLES:
        f = certs.role_files(cert_dir, role)
        assert stat.S_IMODE(os.stat(f.key).st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(f.cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"tandem-{role}" in sans.get_values_for_type(x509.DNSName)
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert stat.S_IMODE(os.stat(cert_dir / "ca-key.pem").st_mode) == 0o600


def test_policy_table():
    assert denial("/tandem.v1.Gateway/Generate", frozenset()) is None
    assert denial("/grpc.health.v1.Health/Check", frozenset()) is None
    assert denial("/tandem.v1.Decode/Generate", frozenset({"gateway"})) is None
    assert "gateway" in denial("/tandem.v1.Decode/Generate", frozenset({"client"}))
    assert denial("/tandem.v1.Prefill/ReleaseKV", frozenset({"decode"})) is None
    assert denial("/tandem.v1.Prefill/Prefill", frozenset({"decode"})) is not None
    assert denial("/tandem.v1.Worker/CheckIntegrity", frozenset({"client"})) is not None
    assert allowed_roles("/tandem.v1.Unknown/Thing") == frozenset()  # fail closed
    assert roles_of({"x509_subject_alternative_name": [b"tandem-decode", b"localhost", b"tandem-"]}) == {"decode"}


async def test_the_right_role_is_served(prefill_server, cert_dir):
    async with dial(files(cert_dir, "gateway"), prefill_server, "prefill") as ch:
        assert (await get_info(ch)).model == "m"
        assert (await release(ch)).released
        async for _ in worker_pb2_grpc.WorkerStub(ch).Watch(worker_pb2.WatchRequest(), timeout=5):
            break
    async with dial(files(cert_dir, "decode"), prefill_server, "prefill") as ch:
        assert (await release(ch)).released  # decode releases the KV it pulled


@pytest.mark.parametrize("role", ["client", "decode", "tokenizer"])
async def test_a_valid_certificate_of_the_wrong_role_is_permission_denied(prefill_server, cert_dir, role):
    async with dial(files(cert_dir, role), prefill_server, "prefill") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_info(ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "gateway role only" in err.value.details() and f"role {role}" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a streaming admin RPC too
            async for _ in worker_pb2_grpc.WorkerStub(ch).Watch(worker_pb2.WatchRequest(), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # health stays open to any certified peer
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_client_checks_the_servers_role(prefill_server, cert_dir):
    # the prefill worker's certificate does not name it a decode worker: the handshake fails
    async with dial(files(cert_dir, "gateway"), prefill_server, "decode") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_info(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_and_certless_clients_are_refused(prefill_server, cert_dir):
    async with grpc.aio.insecure_channel(prefill_server) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    ca = certs.ca_file(cert_dir).read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)  # TLS, but no client certificate
    async with grpc.aio.secure_channel(prefill_server, creds, options=[("grpc.ssl_target_name_override", "tandem-prefill")]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_foreign_ca_and_expired_certificates_are_refused(prefill_server, cert_dir, tmp_path):
    foreign = certs.create(tmp_path / "foreign", roles=("gateway",))
    mixed = TlsFiles(str(foreign / "gateway.pem"), str(foreign / "gateway-key.pem"), str(certs.ca_file(cert_dir)))
    ca_cert, ca_key = certs.load_ca(cert_dir)
    expired_dir = tmp_path / "expired"
    expired_dir.mkdir()
    week_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=7)
    f = certs.write_role_cert(expired_dir, ca_cert, ca_key, "gateway", days=1, not_before=week_ago)
    expired = TlsFiles(str(f.cert), str(f.key), str(certs.ca_file(cert_dir)))
    for tls in (mixed, expired):
        async with dial(tls, prefill_server, "prefill") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get_info(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def served_serial(address: str, d) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    ctx = ssl.create_default_context(cafile=str(certs.ca_file(d)))
    ctx.load_cert_chain(str(d / "client.pem"), str(d / "client-key.pem"))
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock, ctx.wrap_socket(sock, server_hostname="tandem-prefill") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


async def test_a_rotated_certificate_is_served_without_a_restart(cert_dir, tmp_path):
    d = tmp_path / "rot"
    d.mkdir()
    for name in ("ca.pem", "ca-key.pem", "prefill.pem", "prefill-key.pem", "client.pem", "client-key.pem", "gateway.pem", "gateway-key.pem"):
        (d / name).write_bytes((cert_dir / name).read_bytes())
    srv, address = await start_server(files(d, "prefill"))
    try:
        before = served_serial(address, d)
        async with dial(files(d, "gateway"), address, "prefill") as ch:  # a connection open across the rotation
            assert (await get_info(ch)).model == "m"
            time.sleep(0.01)  # a distinct mtime even on coarse clocks
            ca_cert, ca_key = certs.load_ca(d)
            certs.write_role_cert(d, ca_cert, ca_key, "prefill")
            after = served_serial(address, d)
            assert after != before
            assert after == x509.load_pem_x509_certificate((d / "prefill.pem").read_bytes()).serial_number
            assert (await get_info(ch)).model == "m"  # the established connection keeps serving
    finally:
        await srv.stop(None)


async def test_a_half_written_server_rotation_keeps_serving_the_previous_certificate(cert_dir, tmp_path):
    d = tmp_path / "rot"
    d.mkdir()
    for name in ("ca.pem", "ca-key.pem", "prefill.pem", "prefill-key.pem", "client.pem", "client-key.pem"):
        (d / name).write_bytes((cert_dir / name).read_bytes())
    srv, address = await start_server(files(d, "prefill"))
    try:
        before = served_serial(address, d)
        old_key = (d / "prefill-key.pem").read_bytes()
        time.sleep(0.01)
        ca_cert, ca_key = certs.load_ca(d)
        certs.write_role_cert(d, ca_cert, ca_key, "prefill")
        new_key = (d / "prefill-key.pem").read_bytes()
        (d / "prefill-key.pem").write_bytes(old_key)  # the new certificate is on disk, its key not yet
        assert served_serial(address, d) == before
        (d / "prefill-key.pem").write_bytes(new_key)
        assert served_serial(address, d) == x509.load_pem_x509_certificate((d / "prefill.pem").read_bytes()).serial_number
    finally:
        await srv.stop(None)


def test_tls_settings_go_together(cert_dir):
    f = certs.role_files(cert_dir, "decode")
    assert TlsFiles.from_config(ServiceConfig(role="decode")) is None
    with pytest.raises(ValueError, match="tls_ca not set"):
        TlsFiles.from_config(ServiceConfig(role="decode", tls_cert=str(f.cert), tls_key=str(f.key)))
    with pytest.raises(ValueError, match="tls_key: cannot read"):
        TlsFiles.from_config(ServiceConfig(role="decode", tls_cert=str(f.cert), tls_key="/nonexistent", tls_ca=str(certs.ca_file(cert_dir))))


def test_an_https_etcd_endpoint_needs_the_tls_files(cert_dir):
    from services.common import etcd_tls
    from services.common.registry import make_client, parse_endpoint

    assert parse_endpoint("https://10.0.0.5:2379") == ("10.0.0.5", 2379)
    etcd_tls.set_client_tls(None)
    with pytest.raises(ValueError, match="etcd https://127.0.0.1:2379 is https: set tls_cert"):
        make_client("https://127.0.0.1:2379")
    etcd_tls.set_client_tls(files(cert_dir, "gateway"))
    try:
        assert isinstance(make_client("https://127.0.0.1:2379"), etcd_tls.TlsEtcdClient)
        assert not isinstance(make_client("127.0.0.1:2379"), etcd_tls.TlsEtcdClient)  # plain host:port stays plaintext
    finally:
        etcd_tls.set_client_tls(None)
