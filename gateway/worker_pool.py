"""WorkerPool: the gateway's live view of the cluster, from etcd and from the workers themselves.

    etcd watch ──put/delete/snapshot──► WorkerPool.workers {key → WorkerHandle}
    each prefill/decode handle ──Worker.Watch──► load snapshots, KV event batches (sequence numbers)

A worker is routable while its key is in etcd and its Watch stream is connected: a SIGKILLed
worker is skipped as soon as its stream breaks, and dropped when its lease expires. A worker that
revokes its lease (graceful drain, or a worker whose engine died) is dropped at once; requests
already on it finish. A worker whose calls keep failing is ejected for a while by the pool's
outlier detector (outlier_detection.py), whatever etcd and its Watch stream say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tandem.v1 import common_pb2, tokenizer_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.keepalive import Keepalive
from services.common.registry import RegistryWatcher, WatchEvent
from services.common.rotating_channel import RotatingChannel
from services.common.telemetry import client_interceptors
from services.common.tls import TlsFiles

from .decode_mux import DecodeMux, MuxCall
from .outlier_detection import OutlierDetectionConfig, OutlierDetector
from .prefix_index import PrefixIndex

log = logging.getLogger(__name__)

WATCH_RETRY_S = (0.1, 0.25, 0.5, 1.0)
# After etcd comes back empty (it lost its data), services need a moment to register again; a
# worker missing from that listing whose Watch stream is still live keeps serving this long.
RESYNC_GRACE_S = 15.0
# large messages both ways (long prompts and generations); keepalive (keepalive.py) is added per pool
# Each worker channel keeps its own subchannel pool. grpc otherwise shares one subchannel between the
# channels of a target and options, so a restarted worker's new handle waited out the reconnect backoff
# that its dead predecessor's channel (still open, retiring) had grown: 0.1-3.0 s after it registered in
# the chaos test, and with the backoff's 120 s cap, up to minutes after a long outage.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20), ("grpc.use_local_subchannel_pool", 1)]


class InFlight:
    """One request counted on a handle (WorkerHandle.in_flight): its prompt tokens stay in the
    worker's backlog (num_in_flight_tokens) until `computed()`; the request itself stays counted
    until the block ends."""

    def __init__(self, handle: WorkerHandle, num_tokens: int):
        self._handle = handle
        self.num_uncomputed_tokens = num_tokens

    def computed(self) -> None:
        """The prompt's tokens are computed (its first token arrived): they leave the backlog.
        Idempotent. Mutates the handle."""
        self._handle.num_in_flight_tokens -= self.num_uncomputed_tokens
        self.num_uncomputed_tokens = 0


class WorkerHandle:
    """One registered service: its registration, a channel, and (workers) its latest load."""

    def __init__(self, key: str, registration: common_pb2.WorkerRegistration, on_kv_events: Callable | None = None, tls: TlsFiles | None = None,
                 keepalive: Keepalive | None = None, *, on_connected: Callable[[], None] | None = None):  # fmt: skip
        """`on_connected`: called each time the handle becomes connected (not on every event), so
        a request waiting for a worker of this role wakes (WorkerPool.wait_until_ready)."""
        self.key = key
        self.registration = registration
        # with TLS, the worker must prove the role it registered as (its certificate's tandem-<role>);
        # a rotated client certificate is picked up by new calls, and the Watch stream moves over
        options = [*CHANNEL_OPTIONS, *(keepalive or Keepalive()).channel_options()]
        self.channels = RotatingChannel(tls, registration.grpc_address, registration.role, options, client_interceptors(), on_rotate=self._restart_watch)
        self.load: worker_pb2.LoadSnapshot | None = None
        self.kv_sequence = 0
        self.num_in_flight = 0  # requests this gateway sent here that have not finished
        self.num_in_flight_tokens = 0  # their prompt tokens to compute (prefill backlog, at decision time)
        self.connected = registration.role not in ("prefill", "decode")  # workers: once Watch answers
        self.retired = False
        self.ejected_until = 0.0  # time.monotonic() until which outlier detection keeps it out of routing
        self.unlisted_since: float | None = None  # missing from etcd after a resync (see RESYNC_GRACE_S)
        self._on_kv_events = on_kv_events
        self._decode_mux = DecodeMux(registration.worker_id)  # opens its stream with the first request
        self._on_connected = on_connected
        self._watch_task: asyncio.Task | None = None
        if registration.role in ("prefill", "decode"):
            self._watch_task = asyncio.create_task(self._watch(), name=f"watch {registration.worker_id}")

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel a new call must use (it changes when the client certificate is rotated)."""
        return self.channels.current()

    @property
    def worker_id(self) -> str:
        return self.registration.worker_id

    @property
    def role(self) -> str:
        return self.registration.role

    def decode_stub(self) -> worker_pb2_grpc.DecodeStub:
        return worker_pb2_grpc.DecodeStub(self.channel)

    def open_decode(self, request: worker_pb2.WorkerGenerateRequest, timeout: float | None) -> MuxCall:
        """`request` over this worker's shared GenerateMany stream (decode_mux.py): used as the
        Decode.Generate call it stands for."""
        return MuxCall(self._decode_mux, self.channel, request, timeout)

    def prefill_stub(self) -> worker_pb2_grpc.PrefillStub:
        return worker_pb2_grpc.PrefillStub(self.channel)

    def tokenizer_stub(self) -> tokenizer_pb2_grpc.TokenizerStub:
        return tokenizer_pb2_grpc.TokenizerStub(self.channel)

    def _restart_watch(self) -> None:
        """The channel was replaced (certificate rotation): resubscribe on the new one from the last
        batch applied (the worker replays the rest), so the old channel can finish and close."""
        if self._watch_task is not None and not self.retired:
            self._watch_task.cancel()
            self._watch_task = asyncio.create_task(self._watch(), name=f"watch {self.registration.worker_id}")

    async def _watch(self) -> None:
        attempt = 0
        while True:
            call = None
            try:
                call = worker_pb2_grpc.WorkerStub(self.channel).Watch(worker_pb2.WatchRequest(last_sequence=self.kv_sequence))
                async for event in call:
                    self.mark_connected()
                    attempt = 0
                    if event.HasField("load"):
                        self.load = event.load
                    else:
                        batch = event.kv_events
                        if self._on_kv_events is not None and not self._on_kv_events(self, batch):
                            # a gap in the sequence: resubscribe from the last batch applied, so
                            # the worker replays what was missed (or sends a snapshot)
                            raise ConnectionError(f"KV event batch {batch.sequence} does not follow {self.kv_sequence}")
                        self.kv_sequence = batch.sequence
                raise ConnectionError("Watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - unreachable until the stream comes back
                if self.connected:
                    log.warning("lost the Watch stream of %s at %s: %s", self.worker_id, self.registration.grpc_address, e)
                self.connected = False
                await asyncio.sleep(WATCH_RETRY_S[min(attempt, len(WATCH_RETRY_S) - 1)])
                attempt += 1
            finally:
                if call is not None:
                    call.cancel()  # a cancelled watch must not hold its channel open

    @contextlib.contextmanager
    def in_flight(self, num_tokens: int = 0) -> Iterator[InFlight]:
        """Count a request sent here, with `num_tokens` prompt tokens for this worker to compute,
        for as long as the block runs; the routing scorers read the counts. The one way requests
        are counted: the finally releases them whether the block ends, raises or is cancelled, and
        a retired handle closes its channel after its last request. A plain (not async) context
        manager: nothing awaits between counting and the try, so nothing can slip in between."""
        request = InFlight(self, num_tokens)
        self.num_in_flight += 1
        self.num_in_flight_tokens += num_tokens
        try:
            yield request
        finally:
            request.computed()
            self.num_in_flight -= 1
            if self.retired and self.num_in_flight == 0:
                self._decode_mux.close()
                self._closing = asyncio.create_task(self.channels.close())  # held so it is not collected mid-close

    def mark_unreachable(self) -> None:
        """A call failed with UNAVAILABLE: skip this worker until its Watch stream answers again."""
        self.connected = False

    def mark_connected(self) -> None:
        """Its Watch stream answered: routable again. Tells `on_connected` only on the transition
        (a retired handle stays out). Mutates."""
        if self.connected or self.retired:
            return
        self.connected = True
        if self._on_connected is not None:
            self._on_connected()

    async def retire(self) -> None:
        """The worker left etcd: stop watching it; close the channel once no request of ours runs
        on it, so a draining worker finishes what it has."""
        self.retired, self.connected = True, False
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self.num_in_flight == 0:
            self._decode_mux.close()
            await self.channels.close()


class WorkerPool:
    def __init__(self, etcd: str, cluster: str, on_change: Callable | None = None, index: PrefixIndex | None = None, outliers: OutlierDetector | None = None,
                 tls: TlsFiles | None = None, keepalive: Keepalive | None = None):  # fmt: skip
        self.tls = tls  # None: plaintext channels
        self.keepalive = keepalive or Keepalive()
        self.workers: dict[str, WorkerHandle] = {}
        self.index = index or PrefixIndex()  # which worker holds which KV blocks, from their events
        self.outliers = outliers or OutlierDetector(OutlierDetectionConfig())
        self._on_change = on_change
        self._grace_tasks: set[asyncio.Task] = set()
        # replaced (after being set) whenever a handle connects: every waiter of wait_until_ready
        # holds the previous one, so all of them wake and look again
        self._readiness_changed = asyncio.Event()
        self.watcher = RegistryWatcher(etcd, cluster, self._apply)  # connects on start(), not here

    async def start(self, timeout: float = 30.0) -> None:
        """Start watching etcd; return after the first full listing (raises TimeoutError)."""
        self.watcher.start()
        await asyncio.wait_for(self.watcher.synced.wait(), timeout)

    def ready(self, role: str) -> list[WorkerHandle]:
        """Handles of `role` that can take a request now."""
        return [h for h in self.workers.values() if h.role == role and h.connected]

    def registered(self, role: str) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.role == role]

    async def wait_until_ready(self, role: str, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until a handle of `role` can take a request: True as
        soon as one is ready; False after `timeout`, or at once when no live handle of `role` is
        registered (nothing is connecting). For a worker that registered but whose Watch stream
        has not answered yet (just started or restarted). Event-driven: wakes whenever a handle
        connects. A handle that leaves meanwhile does not end the wait: its replacement (a
        restart re-registering) may still connect in time. Does not mutate."""
        if not self.ready(role) and not any(not h.retired for h in self.registered(role)):
            return False
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                while not self.ready(role):
                    await self._readiness_changed.wait()
                return True
        except TimeoutError:
            return bool(self.ready(role))

    def _notify_readiness_changed(self) -> None:
        """Wake every wait_until_ready (a handle connected). Mutates the event only."""
        changed, self._readiness_changed = self._readiness_changed, asyncio.Event()
        changed.set()

    def served_models(self) -> dict[str, int]:
        """The models the registered decode workers serve, with the smallest context among them."""
        models: dict[str, int] = {}
        for h in self.registered("decode"):
            reg = h.registration
            models[reg.model] = min(models.get(reg.model, reg.max_model_len), reg.max_model_len)
        return models

    def record_outcome(self, handle: WorkerHandle, code: grpc.StatusCode) -> None:
        """A call to `handle` ended with `code` (OK included): feed the outlier detector. Mutates."""
        if handle.key in self.workers:  # a worker that left is not judged any more
            self.outliers.record(handle, code, self.registered(handle.role))

    async def _apply(self, event: WatchEvent) -> None:
        if event.kind == "snapshot":
            for key in [k for k in self.workers if k not in event.registrations]:
                handle = self.workers[key]
                if handle.connected and self.watcher.num_resyncs > 0:
                    # a resync (not the first listing): keep a live worker while it registers again
                    handle.unlisted_since = time.monotonic()
                    self._grace_tasks.add(asyncio.create_task(self._drop_if_still_unlisted(key, handle)))
                else:
                    await self._remove(key)
            for key, reg in event.registrations.items():
                await self._put(key, reg)
        elif event.kind == "put":
            await self._put(event.key, event.registration)
        else:
            handle = self.workers.get(event.key)
            if handle is not None and handle.connected and handle.role in ("prefill", "decode"):
                # a lease can also lapse while the worker lives (etcd frozen past the TTL): ask it
                self._grace_tasks.add(asyncio.create_task(self._drop_unless_serving(event.key, handle)))
            else:
                await self._remove(event.key)
        if self._on_change is not None:
            self._on_change(self)

    async def _drop_unless_serving(self, key: str, handle: WorkerHandle) -> None:
        """A connected worker's key was deleted. A worker that drains or whose engine died goes
        NOT_SERVING before it revokes its lease: drop it now. One that still says SERVING lost its
        lease to an etcd outage (frozen past the TTL) and registers again when etcd answers: keep it
        routable for RESYNC_GRACE_S, as after a resync. Unreachable: drop it."""
        try:
            try:
                reply = await health_pb2_grpc.HealthStub(handle.channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                serving = False
            if self.workers.get(key) is not handle:
                return
            if not serving:
                await self._remove_and_report(key)
                return
            log.warning(
                "%s %s lost its etcd key but still serves (an etcd outage?); keeping it %.0fs for it to register again",
                handle.role,
                handle.worker_id,
                RESYNC_GRACE_S,
            )
            handle.unlisted_since = time.monotonic()
            await self._drop_if_still_unlisted(key, handle)
        finally:
            self._grace_tasks.discard(asyncio.current_task())

    async def _drop_if_still_unlisted(self, key: str, handle: WorkerHandle) -> None:
        """After RESYNC_GRACE_S, drop a worker that etcd still does not list (it did not register again)."""
        try:
            await asyncio.sleep(RESYNC_GRACE_S)
            if self.workers.get(key) is handle and handle.unlisted_since is not None:
                log.warning("%s %s did not register again after etcd came back; dropping it", handle.role, handle.worker_id)
                await self._remove_and_report(key)
        finally:
            self._grace_tasks.discard(asyncio.current_task())

    async def _remove_and_report(self, key: str) -> None:
        """_remove from a background task: the watch event that called _on_change has passed."""
        await self._remove(key)
        if self._on_change is not None:
            self._on_change(self)

    async def _put(self, key: str, reg: common_pb2.WorkerRegistration) -> None:
        old = self.workers.get(key)
        same_process = old is not None and (old.registration.grpc_address, old.worker_id, old.registration.started_unix_ms) == (
            reg.grpc_address, reg.worker_id, reg.started_unix_ms)  # fmt: skip
        if same_process:
            old.registration = reg  # a re-registration after an etcd outage: same worker, keep its state
            old.unlisted_since = None
            return
        if old is not None:
            await self._remove(key)
        self.workers[key] = WorkerHandle(key, reg, self._apply_kv_events, tls=self.tls, keepalive=self.keepalive, on_connected=self._notify_readiness_changed)
        log.info("discovered %s %s at %s", reg.role, reg.worker_id, reg.grpc_address)

    def _apply_kv_events(self, handle: WorkerHandle, batch) -> bool:
        return self.index.apply(handle.worker_id, batch)

    async def _remove(self, key: str) -> None:
        handle = self.workers.pop(key, None)
        if handle is not None:
            self.index.remove_worker(handle.worker_id)
            self.outliers.forget(key)
            log.info("%s %s left the cluster", handle.role, handle.worker_id)
            await handle.retire()

    async def close(self) -> None:
        await self.watcher.stop()
        for task in list(self._grace_tasks):
            task.cancel()
        await asyncio.gather(*self._grace_tasks, return_exceptions=True)
        for key in list(self.workers):
            await self._remove(key)
