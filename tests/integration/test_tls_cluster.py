"""A whole cluster with TLS (`tandem up --tls`'s ClusterSpec): mTLS on every internal gRPC hop,
TLS on the gateway's gRPC port, HTTPS on the OpenAI API — real processes on loopback.
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tandem import certs
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

AGG, DISAGG = gateway_pb2.SERVING_MODE_AGGREGATED, gateway_pb2.SERVING_MODE_DISAGGREGATED
ROLE_ARGS = {"gateway": ["--disagg-min-uncached-tokens", "0"]}


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, default_model_dir):
    with running_cluster(tmp_path_factory.mktemp("tls"), tls=True, role_args=ROLE_ARGS) as c:
        yield c


def cert_dir(c):
    return c.workdir / "certs"


def gateway_channel(c) -> grpc.Channel:
    # a public client: trusts the CA, presents no certificate (API keys authenticate clients)
    return grpc.secure_channel(c.gateway_address, grpc.ssl_channel_credentials(certs.ca_file(cert_dir(c)).read_bytes()))


def role_channel(c, address: str, my_role: str, server_role: str) -> grpc.Channel:
    d = cert_dir(c)
    f = certs.role_files(d, my_role)
    creds = grpc.ssl_channel_credentials(certs.ca_file(d).read_bytes(), f.key.read_bytes(), f.cert.read_bytes())
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", f"tandem-{server_role}")])


def generate(c, mode) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=[1000 + (i * 7919) % 30000 for i in range(40)]), mode=mode,
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    )  # fmt: skip
    with gateway_channel(c) as ch:
        return [t for chunk in gateway_pb2_grpc.GatewayStub(ch).Generate(request, timeout=120) for t in chunk.token_ids]


def test_disaggregated_serving_over_mtls_matches_aggregated(tls_cluster):
    assert generate(tls_cluster, DISAGG) == generate(tls_cluster, AGG)


def test_a_plaintext_client_is_refused_on_every_port(tls_cluster):
    for svc in tls_cluster.services:
        with grpc.insecure_channel(svc.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, svc.name
        assert svc.is_serving(timeout=5), svc.name  # the same port, with the client certificate (`tandem health --tls-dir`)
    http_url = tls_cluster.gateway_http_url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(http_url + "/models", timeout=5)


def test_a_certificate_of_the_wrong_role_is_permission_denied(tls_cluster):
    decode = tls_cluster.service("decode-0").address
    request = worker_pb2.WorkerGenerateRequest()
    with role_channel(tls_cluster, decode, "client", "decode") as ch:
        with pytest.raises(grpc.RpcError) as err:
            list(worker_pb2_grpc.DecodeStub(ch).Generate(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "gateway role only" in err.value.details()
    prefill = tls_cluster.service("prefill-0").address
    with role_channel(tls_cluster, prefill, "decode", "prefill") as ch:
        with pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.PrefillStub(ch).Prefill(worker_pb2.PrefillRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_openai_sdk_over_https_with_the_dev_ca(tls_cluster):
    assert tls_cluster.gateway_http_url.startswith("https://")
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs.ca_file(cert_dir(tls_cluster)))))
    with openai.OpenAI(base_url=tls_cluster.gateway_http_url, api_key="unused", max_retries=0, timeout=120, http_client=http) as client:
        out = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4, temperature=0)
        assert out.choices[0].text


def _served_serial(url: str, ca) -> int:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=5) as sock, ctx.wrap_socket(sock, server_hostname=host) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def test_a_renewed_gateway_certificate_is_served_without_a_restart(tls_cluster):
    d = cert_dir(tls_cluster)
    url, ca = tls_cluster.gateway_http_url, certs.ca_file(d)
    before = _served_serial(url, ca)
    ca_cert, ca_key = certs.load_ca(d)
    certs.write_role_cert(d, ca_cert, ca_key, "gateway")
    renewed = x509.load_pem_x509_certificate((d / "gateway.pem").read_bytes()).serial_number
    assert renewed != before
    wait_for(lambda: _served_serial(url, ca) == renewed, "the HTTPS port to serve the renewed certificate", timeout=10)
    assert generate(tls_cluster, AGG)  # and the gRPC port serves it too (a new channel's handshake)


def test_etcd_serves_only_clients_with_a_certificate_of_the_ca(tls_cluster, tmp_path):
    import asyncio

    import aetcd

    from services.common.etcd_auth import EtcdCredentials
    from services.common.etcd_tls import TlsEtcdClient
    from services.common.registry import parse_endpoint
    from services.common.tls import TlsFiles

    assert tls_cluster.etcd_endpoint.startswith("https://")
    host, port = parse_endpoint(tls_cluster.etcd_endpoint)
    d = cert_dir(tls_cluster)
    foreign = certs.create(tmp_path / "foreign", roles=("client",))

    async def count_keys(client) -> int:
        async with client:
            return (await client.get_prefix(f"/tandem/{tls_cluster.spec.cluster}/".encode())).count  # the services user may read its cluster only

    client_tls = TlsFiles(str(d / "client.pem"), str(d / "client-key.pem"), str(d / "ca.pem"))
    auth = tls_cluster.etcd_auth  # `tandem up --tls` also turns on etcd's user/password auth
    login = EtcdCredentials(auth.username, auth.password_file.read_text().strip())

    async def main():
        assert await count_keys(TlsEtcdClient(host=host, port=port, timeout=5, tls=client_tls, credentials=login)) > 0
        with pytest.raises(Exception, match="user name is empty|permission denied"):  # the CA's certificate alone no longer suffices
            await asyncio.wait_for(count_keys(TlsEtcdClient(host=host, port=port, timeout=3, tls=client_tls)), 10)
        for client in (aetcd.Client(host=host, port=port, timeout=3),  # plaintext
                       TlsEtcdClient(host=host, port=port, timeout=3, tls=TlsFiles(str(foreign / "client.pem"), str(foreign / "client-key.pem"), str(d / "ca.pem")))):  # fmt: skip
            with pytest.raises(Exception):  # noqa: B017 - refused at the TLS handshake or by auth: the error type is aetcd's choice
                await asyncio.wait_for(count_keys(client), 10)

    asyncio.run(main())

    # `tandem scheduling` over TLS, with the client certificate
    from tandem.cli import main as cli_main

    tls_flags = ["--tls-cert", str(d / "client.pem"), "--tls-key", str(d / "client-key.pem"), "--tls-ca", str(d / "ca.pem")]
    auth_flags = ["--etcd-username", auth.username, "--etcd-password-file", str(auth.password_file)]
    assert cli_main(["scheduling", "--etcd", tls_cluster.etcd_endpoint, *tls_flags, *auth_flags, "show"]) == 0


def test_the_etcd_password_is_in_no_childs_argv_or_log(tls_cluster):
    auth = tls_cluster.etcd_auth
    password = auth.password_file.read_text().strip()
    assert auth.password_file.stat().st_mode & 0o077 == 0 and auth.root_password_file.stat().st_mode & 0o077 == 0
    for svc in tls_cluster.services:
        argv = Path(f"/proc/{svc.proc.pid}/cmdline").read_bytes().decode()
        assert "--etcd-password-file" in argv and password not in argv, svc.name
        assert password not in svc.log_path.read_text(errors="replace"), svc.name


@pytest.mark.parametrize("backend", ["tandem", "openai"])
def test_tandem_bench_drives_a_tls_front_door_with_the_dev_ca(tls_cluster, tmp_path, backend):
    import json
    import subprocess
    import sys

    target = ["--gateway", tls_cluster.gateway_address] if backend == "tandem" else ["--backend", "openai", "--base-url", tls_cluster.gateway_http_url]
    cmd = [sys.executable, "-m", "tandem", "bench", "random", *target, "--input-len", "32", "--output-len", "4", "--num-prompts", "3",
           "--request-rate", "inf", "--vocab-size", "30000", "--no-progress", "--connect-timeout", "20"]  # fmt: skip
    refused = subprocess.run([*cmd, "--out", str(tmp_path / "no-ca")], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0  # the system's trust store does not know the dev CA
    done = subprocess.run([*cmd, "--out", str(tmp_path / "ca"), "--tls-ca", str(certs.ca_file(cert_dir(tls_cluster)))],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "ca" / "result.json").read_text())
    assert (result["completed"], result["failed"]) == (3, 0)
