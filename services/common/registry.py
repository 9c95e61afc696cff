"""The etcd registry: each process keeps one key alive under one lease, and the gateway watches them.

    /tandem/<cluster>/workers/<role>/<worker id>  →  WorkerRegistration as JSON, under the lease

Registration is a background task: grant a lease (TTL `ttl`), put the key under it, then refresh
the lease every ttl/3. Any failure (etcd down, lease expired while it was down, etcd restarted
with an empty data dir) drops back to "grant a new lease and put the key again", with backoff,
so an etcd outage never stops a service and it reappears on its own. Revoking the lease on
shutdown deletes the key at once: that is the graceful drain signal the gateway sees.

The client is aetcd (asyncio-native over grpc.aio, works with our protobuf; the lease refresh
loop is ours by design, so its timing and recovery are explicit). See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aetcd
from google.protobuf import json_format

from protos.tandem.v1 import common_pb2

from .etcd_auth import client_credentials, explain_refusal
from .etcd_client import EtcdClient
from .etcd_tls import TlsEtcdClient, client_tls_for

log = logging.getLogger(__name__)

# etcd calls that take longer than this count as "etcd is unreachable"
ETCD_CALL_TIMEOUT_S = 2.0
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


def workers_prefix(cluster: str) -> str:
    return f"/tandem/{cluster}/workers/"


def worker_key(cluster: str, role: str, worker_id: str) -> str:
    return f"{workers_prefix(cluster)}{role}/{worker_id}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' (an http:// prefix is accepted, as etcdctl writes it) → (host, port)."""
    endpoint = endpoint.removeprefix("http://").removeprefix("https://")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def encode_registration(reg: common_pb2.WorkerRegistration) -> bytes:
    return json_format.MessageToJson(reg, indent=None).encode()


def decode_registration(value: bytes) -> common_pb2.WorkerRegistration:
    return json_format.Parse(value.decode(), common_pb2.WorkerRegistration(), ignore_unknown_fields=True)


def make_client(endpoint: str) -> aetcd.Client:
    """A client of `endpoint`; https://HOST:PORT: TLS with this process's certificate (etcd_tls.py);
    authenticated as this process's etcd user when one is set (etcd_auth.py)."""
    tls, host_port = client_tls_for(endpoint), parse_endpoint(endpoint)
    if tls is not None:
        return TlsEtcdClient(host=host_port[0], port=host_port[1], timeout=ETCD_CALL_TIMEOUT_S, tls=tls, credentials=client_credentials())
    return EtcdClient(host=host_port[0], port=host_port[1], timeout=ETCD_CALL_TIMEOUT_S, credentials=client_credentials())


async def close_quietly(client: aetcd.Client) -> None:
    """Close `client` (its next call reconnects and authenticates again); a dead channel's errors are dropped."""
    try:
        await asyncio.wait_for(client.close(), ETCD_CALL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - closing a dead channel can fail; nothing leaks
        pass


class Registration:
    """Keeps one key registered under one lease, across etcd outages, until stop()."""

    def __init__(self, endpoint: str, key: str, value: bytes, ttl: int):
        self.key, self.value, self.ttl = key, value, ttl
        self._client = make_client(endpoint)
        self._endpoint = endpoint
        self._lease_id: int | None = None
        self._registered = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_registrations = 0  # how many times the key was (re)put under a fresh lease

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def start(self, timeout: float = 30.0) -> None:
        """Start the background keep-alive; return once the key is in etcd. Raises TimeoutError
        (saying which endpoint) when etcd cannot be reached in `timeout` seconds, and EtcdAuthError
        at once when etcd refuses our credentials or permissions (no retry fixes those)."""
        task = self._task = asyncio.create_task(self._keep_registered(), name=f"etcd-registration {self.key}")
        registered = asyncio.ensure_future(self._registered.wait())
        try:
            await asyncio.wait((registered, task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            registered.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            self._task = None
            await self.stop()
            raise task.exception()
        if not self._registered.is_set():
            await self.stop()
            raise TimeoutError(f"could not register {self.key} in etcd at {self._endpoint} within {timeout:.0f}s; is etcd running?")

    async def _keep_registered(self) -> None:
        attempt = 0
        while True:
            try:
                lease = await asyncio.wait_for(self._client.lease(self.ttl), ETCD_CALL_TIMEOUT_S)
                self._lease_id = lease.id
                await asyncio.wait_for(self._client.put(self.key.encode(), self.value, lease=lease.id), ETCD_CALL_TIMEOUT_S)
                self.num_registrations += 1
                self._registered.set()
                if self.num_registrations > 1:
                    log.info("re-registered %s under lease %x", self.key, lease.id)
                attempt = 0
                await self._refresh_until_lost(lease.id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any etcd failure means: register again later
                self._registered.clear()
                refusal = explain_refusal(e, self._endpoint, f"register {self.key}")
                if refusal is not None and self.num_registrations == 0:
                    raise refusal from None  # at startup: start() reports it, the service stops
                # a fresh connection authenticates again: etcd forgets tokens when it restarts
                await close_quietly(self._client)
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                log.log(logging.ERROR if refusal else logging.WARNING, "etcd registration of %s lost (%s); retrying in %.1fs", self.key, refusal or e, delay)
                await asyncio.sleep(delay)

    async def _refresh_until_lost(self, lease_id: int) -> None:
        """Refresh the lease every ttl/3; raise when a refresh fails or the lease is gone."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            reply = await asyncio.wait_for(self._client.refresh_lease(lease_id), ETCD_CALL_TIMEOUT_S)
            if reply is None or reply.TTL <= 0:
                raise LookupError(f"lease {lease_id:x} expired")

    async def stop(self) -> None:
        """Stop refreshing and revoke the lease, which deletes the key now. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._lease_id is not None and self._registered.is_set():
            try:
                await asyncio.wait_for(self._client.revoke_lease(self._lease_id), ETCD_CALL_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - etcd gone: the lease expires by itself
                log.warning("could not revoke lease of %s (%s); it expires within %ds", self.key, e, self.ttl)
        self._lease_id = None
        self._registered.clear()
        await self._client.close()


@dataclass
class WatchEvent:
    kind: str  # "snapshot" (registrations = everything) | "put" | "delete"
    key: str
    registration: common_pb2.WorkerRegistration | None = None
    registrations: dict[str, common_pb2.WorkerRegistration] | None = None


class RegistryWatcher:
    """Watches /tandem/<cluster>/workers/ and reports changes to `on_event`.

    Each (re)connection starts with a full snapshot (a range read) and then watches from the
    revision after it, so nothing between the two is missed. While etcd is unreachable no event
    is reported: the caller keeps what it knew (workers keep serving through an etcd outage)."""

    def __init__(self, endpoint: str, cluster: str, on_event: Callable[[WatchEvent], Awaitable[None] | None], prefix: str | None = None, decode=None):
        """`prefix` and `decode(key, value) → value or None` watch other keys (default: the
        cluster's workers, decoded as WorkerRegistrations; the event's `registration(s)`)."""
        self._endpoint = endpoint
        self.prefix = prefix if prefix is not None else workers_prefix(cluster)
        self._decode = decode if decode is not None else self._decode_registration
        self._on_event = on_event
        self._task: asyncio.Task | None = None
        self.synced = asyncio.Event()  # set after the first snapshot
        self.num_resyncs = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="etcd-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _emit(self, event: WatchEvent) -> None:
        result = self._on_event(event)
        if asyncio.iscoroutine(result):
            await result

    async def _run(self) -> None:
        attempt = 0
        while True:
            client = make_client(self._endpoint)
            try:
                snapshot = await asyncio.wait_for(client.get_prefix(self.prefix.encode()), ETCD_CALL_TIMEOUT_S)
                regs = {}
                for kv in snapshot.kvs:
                    reg = self._decode(kv.key, kv.value)
                    if reg is not None:
                        regs[kv.key.decode()] = reg
                await self._emit(WatchEvent("snapshot", "", registrations=regs))
                self.num_resyncs += 1
                self.synced.set()
                attempt = 0
                watch = await client.watch_prefix(self.prefix.encode(), start_revision=snapshot.header.revision + 1)
                async for event in watch:
                    key = event.kv.key.decode()
                    if event.kind == "PUT":
                        reg = self._decode(event.kv.key, event.kv.value)
                        if reg is not None:
                            await self._emit(WatchEvent("put", key, registration=reg))
                    else:
                        await self._emit(WatchEvent("delete", key))
                raise ConnectionError("etcd watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect and resync on any failure
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                refusal = explain_refusal(e, self._endpoint, f"read {self.prefix}")  # logged as what to fix; retried, as rights can be granted live
                log.log(
                    logging.ERROR if refusal else logging.WARNING, "etcd watch of %s interrupted (%s); resyncing in %.1fs", self.prefix, refusal or e, delay
                )
                await asyncio.sleep(delay)
            finally:
                await close_quietly(client)

    @staticmethod
    def _decode_registration(key: bytes, value: bytes) -> common_pb2.WorkerRegistration | None:
        try:
            return decode_registration(value)
        except Exception as e:  # noqa: BLE001 - one malformed key must not stop discovery
            log.warning("ignoring malformed registration at %s: %s", key.decode(errors="replace"), e)
            return None
