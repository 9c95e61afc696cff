"""grpc.health.v1 Check from the command line and the launcher (`tandem health HOST:PORT`)."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, tls_dir, role: str | None) -> grpc.Channel:
    """tls_dir (a `tandem certs` directory): dial with its client certificate, checking the server's
    role; workers refuse a TLS handshake without a client certificate, health included."""
    if tls_dir is None:
        return grpc.insecure_channel(address)
    from services.common.peer_roles import role_identity

    read = lambda name: (Path(tls_dir) / name).read_bytes()  # noqa: E731
    creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client-key.pem"), read("client.pem"))
    options = [("grpc.ssl_target_name_override", role_identity(role))] if role else []
    return grpc.secure_channel(address, creds, options=options)


def check_health(address: str, service: str = "", timeout: float = 2.0, tls_dir=None, role: str | None = None) -> bool:
    """True when the server at `address` answers SERVING for `service` ('' = the whole server)."""
    with _channel(address, tls_dir, role) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
