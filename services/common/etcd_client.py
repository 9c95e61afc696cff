"""EtcdClient: aetcd's client, dialing etcd in plaintext or over TLS, and authenticating as a user.

aetcd 1.0's connect always opens a plaintext channel (`rpc.insecure_channel`) and, when its
Authenticate call fails, leaves that channel open behind it; this connect opens the channel this
process needs (TLS with its certificate, etcd_tls.py), authenticates with its credentials
(etcd_auth.py), closes the channel on any failure, and otherwise is aetcd's.

The auth token lives in the connection: etcd forgets tokens when it restarts (and after
--auth-token-ttl idle seconds), so a caller that sees a failure closes the client, and the next
call connects and authenticates again (registry.py does).
"""

from __future__ import annotations

import asyncio
import logging

import aetcd
import grpc
from aetcd import exceptions, rpc, watcher

from .etcd_auth import EtcdCredentials
from .peer_roles import role_identity
from .tls import TlsFiles, channel_credentials

log = logging.getLogger(__name__)


class EtcdClient(aetcd.Client):
    def __init__(self, *args, tls: TlsFiles | None = None, credentials: EtcdCredentials | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._tls = tls
        self._credentials = credentials

    def _open_channel(self) -> grpc.aio.Channel:
        target = f"{self._host}:{self._port}"
        if self._tls is None:
            return rpc.insecure_channel(target, options=self._options.items())
        # etcd's certificate names the etcd role (tandem-etcd), whatever host we dialed
        options = [*self._options.items(), ("grpc.ssl_target_name_override", role_identity("etcd"))]
        return grpc.aio.secure_channel(target, channel_credentials(self._tls), options=options)

    async def _authenticate(self, channel: grpc.aio.Channel):
        """The metadata every call carries: the auth token, or None without credentials."""
        if self._credentials is None:
            return None
        request = rpc.AuthenticateRequest(name=self._credentials.username, password=self._credentials.password)
        try:
            reply = await rpc.AuthStub(channel).Authenticate(request, timeout=self._timeout)
        except rpc.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "authentication is not enabled" in (e.details() or ""):
                # credentials rolled out before etcd's auth is switched on (etcd's documented order)
                log.warning("etcd at %s:%s has authentication disabled; etcd_username %r is not used", self._host, self._port, self._credentials.username)
                return None
            exceptions._handle_exception(e)  # aetcd's error types, as every other call raises
        return (("token", reply.token),)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            channel = self._open_channel()
            try:
                self.metadata = await self._authenticate(channel)
            except BaseException:
                await channel.close()
                raise
            self.channel = channel
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
