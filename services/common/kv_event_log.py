"""KVEventLog: a worker's KV cache events as sequence-numbered batches, kept for replay.

    batches:  [seq 41][seq 42][seq 43] ... [seq N]     the last `max_batches`, oldest first
    held:     {block hashes the cache holds after seq N}

A consumer (the gateway's prefix index) that reconnects with the last sequence it saw gets the
missed batches replayed; when they have been dropped (or the worker restarted and its sequence
went back) it gets one snapshot batch instead: every held hash, with snapshot=True meaning
"forget what you knew". `held` is kept from the events themselves, so a snapshot is exactly the
state after its sequence number. Runs on the event loop only; not thread-safe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from protos.tandem.v1 import worker_pb2


class KVEventLog:
    def __init__(self, max_batches: int = 1024):
        self.sequence = 0
        self._batches: deque[worker_pb2.KVEventBatch] = deque(maxlen=max_batches)
        self.held: set[int] = set()

    def append(self, events: Iterable) -> worker_pb2.KVEventBatch | None:
        """Record one batch of engine KVEvents (kind, block_hashes, parent_hash). Mutates.
        Returns the batch, or None when there was nothing to record."""
        protos = []
        for ev in events:
            if ev.kind == "stored":
                stored = worker_pb2.BlocksStored(block_hashes=ev.block_hashes)
                if ev.parent_hash is not None:
                    stored.parent_hash = ev.parent_hash
                protos.append(worker_pb2.KVEvent(stored=stored))
                self.held.update(ev.block_hashes)
            elif ev.kind == "removed":
                protos.append(worker_pb2.KVEvent(removed=worker_pb2.BlocksRemoved(block_hashes=ev.block_hashes)))
                self.held.difference_update(ev.block_hashes)
            elif ev.kind == "cleared":
                protos.append(worker_pb2.KVEvent(cleared=worker_pb2.AllBlocksCleared()))
                self.held.clear()
            else:
                raise ValueError(f"unknown KV event kind {ev.kind!r}")
        if not protos:
            return None
        self.sequence += 1
        batch = worker_pb2.KVEventBatch(sequence=self.sequence, events=protos)
        self._batches.append(batch)
        return batch

    def snapshot(self) -> worker_pb2.KVEventBatch:
        stored = worker_pb2.KVEvent(stored=worker_pb2.BlocksStored(block_hashes=sorted(self.held)))
        return worker_pb2.KVEventBatch(sequence=self.sequence, snapshot=True, events=[stored])

    def since(self, last_sequence: int) -> list[worker_pb2.KVEventBatch]:
        """What a consumer that has seen up to `last_sequence` needs to catch up (does not mutate)."""
        if last_sequence == self.sequence:
            return []
        oldest = self._batches[0].sequence if self._batches else self.sequence + 1
        if 0 < last_sequence < self.sequence and last_sequence + 1 >= oldest:
            return [b for b in self._batches if b.sequence > last_sequence]
        return [self.snapshot()]

    def check_integrity(self) -> None:
        seqs = [b.sequence for b in self._batches]
        assert seqs == list(range(self.sequence - len(seqs) + 1, self.sequence + 1)), f"batch sequences not contiguous: {seqs[:3]}…{seqs[-3:]}"
