"""etcd over TLS with a client certificate: `--etcd https://HOST:PORT` plus the service's TLS files.

aetcd 1.0 always dials etcd in plaintext (`rpc.insecure_channel` inside `Client.connect`), so this
client repeats its connect with a secure channel and otherwise is aetcd's. The process presents
its own certificate (etcd started with --client-cert-auth admits any certificate of the cluster CA)
and checks that the server's certificate names the etcd role (`tandem-etcd`).

One process has one identity: ServiceRunner (and `tandem scheduling`) call set_client_tls once,
and every make_client in the process (registration, the gateway's watch, live config) uses it.
"""

from __future__ import annotations

import aetcd
import grpc
from aetcd import rpc, watcher

from .peer_roles import role_identity
from .tls import TlsFiles, channel_credentials

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


class TlsEtcdClient(aetcd.Client):
    def __init__(self, *args, tls: TlsFiles, **kwargs):
        super().__init__(*args, **kwargs)
        self._tls = tls

    async def connect(self) -> None:  # aetcd.Client.connect with a secure channel; no user/password
        if self._connected.is_set():
            return
        if self._is_connecting:
            import asyncio

            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            options = [*self._options.items(), ("grpc.ssl_target_name_override", role_identity("etcd"))]
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", channel_credentials(self._tls), options=options)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
