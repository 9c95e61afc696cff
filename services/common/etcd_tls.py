"""etcd over TLS with a client certificate: `--etcd https://HOST:PORT` plus the service's TLS files.

aetcd 1.0 always dials etcd in plaintext (`rpc.insecure_channel` inside `Client.connect`), so this
client repeats its connect with a secure channel and otherwise is aetcd's. The process presents
its own certificate (etcd started with --client-cert-auth admits any certificate of the cluster CA)
and checks that the server's certificate names the etcd role (`tandem-etcd`). User/password
authentication, when configured, comes on top (etcd_auth.py; the connect is etcd_client.py's).

One process has one identity: ServiceRunner (and `tandem scheduling`) call set_client_tls once,
and every make_client in the process (registration, the gateway's watch, live config) uses it.
"""

from __future__ import annotations

from .etcd_client import EtcdClient
from .tls import TlsFiles

_client_tls: TlsFiles | None = None
HTTPS = "https://"


def set_client_tls(files: TlsFiles | None) -> None:
    global _client_tls
    _client_tls = files


def client_tls_for(endpoint: str) -> TlsFiles | None:
    """The TLS files for `endpoint` (None: plaintext). https:// without TLS files is an error."""
    if not endpoint.startswith(HTTPS):
        return None
    if _client_tls is None:
        raise ValueError(f"etcd {endpoint} is https: set tls_cert, tls_key and tls_ca (the client certificate etcd requires)")
    return _client_tls


class TlsEtcdClient(EtcdClient):
    """An EtcdClient that always dials TLS with `tls` (what make_client builds for https://)."""

    def __init__(self, *args, tls: TlsFiles, **kwargs):
        super().__init__(*args, tls=tls, **kwargs)
