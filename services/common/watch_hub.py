"""WatchHub: what a worker publishes on Worker.Watch — load snapshots and sequence-numbered KV
event batches — and its subscribers' queues.

    engine update (stats, KV events) ──publish()──► KVEventLog (replayable batches)
                                                └──► every subscriber's queue: the KV batch, then
                                                     a load snapshot when the load changed

Real workers (services/worker/engine_host.py) and simulated ones (loadtest/) publish through it,
so both behave the same on the wire. `stats` is anything with num_running, num_waiting,
kv_cache_usage, num_used_blocks, num_total_blocks and num_pending_prefill_tokens. Event-loop only.
"""

from __future__ import annotations

import asyncio
import time

from protos.tandem.v1 import worker_pb2

from .kv_event_log import KVEventLog

SUBSCRIBER_QUEUE_SIZE = 4096


class SubscriberOverflow(Exception):
    """A Worker.Watch consumer fell so far behind that its queue filled up."""


class Subscriber:
    def __init__(self):
        self.queue: asyncio.Queue[worker_pb2.WorkerEvent] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)
        self.overflowed = False

    def put(self, event: worker_pb2.WorkerEvent) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # it must reconnect with its last sequence number and catch up by replay or snapshot
            self.overflowed = True

    async def get(self) -> worker_pb2.WorkerEvent:
        if self.overflowed:
            raise SubscriberOverflow("the watcher fell behind; reconnect with last_sequence to catch up")
        return await self.queue.get()


class WatchHub:
    def __init__(self, worker_id: str, max_batches: int = 1024):
        self.worker_id = worker_id
        self.kv_log = KVEventLog(max_batches)
        self.stats = None  # the last published stats
        self._subscribers: set[Subscriber] = set()
        self._last_load_key = None

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def load_snapshot(self) -> worker_pb2.LoadSnapshot:
        """The load as of the last publish (all zero before the first). Does not mutate."""
        s = self.stats
        snapshot = worker_pb2.LoadSnapshot(worker_id=self.worker_id, kv_event_sequence=self.kv_log.sequence, timestamp_unix_ms=int(time.time() * 1000))
        if s is not None:
            snapshot.num_requests_running = s.num_running
            snapshot.num_requests_waiting = s.num_waiting
            snapshot.kv_cache_usage = s.kv_cache_usage
            snapshot.num_used_blocks = s.num_used_blocks
            snapshot.num_total_blocks = s.num_total_blocks
            snapshot.num_pending_prefill_tokens = s.num_pending_prefill_tokens
        return snapshot

    def publish(self, stats, events) -> None:
        """Record the engine's KV events as one batch and send it, then a load snapshot when the
        load changed (one per change, not one per engine step). Mutates."""
        self.stats = stats
        batch = self.kv_log.append(events)
        if batch is not None:
            self._broadcast(worker_pb2.WorkerEvent(kv_events=batch))
        load_key = (stats.num_running, stats.num_waiting, stats.num_used_blocks, stats.num_pending_prefill_tokens)
        if load_key != self._last_load_key:
            self._last_load_key = load_key
            self._broadcast(worker_pb2.WorkerEvent(load=self.load_snapshot()))

    def _broadcast(self, event: worker_pb2.WorkerEvent) -> None:
        for sub in self._subscribers:
            sub.put(event)

    def subscribe(self, last_sequence: int) -> tuple[Subscriber, list[worker_pb2.WorkerEvent]]:
        """A new Watch consumer: its queue, and what it must receive first (catch-up KV batches,
        then the current load). Atomic on the event loop, so nothing falls between the two."""
        sub = Subscriber()
        self._subscribers.add(sub)
        first = [worker_pb2.WorkerEvent(kv_events=b) for b in self.kv_log.since(last_sequence)]
        first.append(worker_pb2.WorkerEvent(load=self.load_snapshot()))
        return sub, first

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
