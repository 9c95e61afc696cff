"""Worker.Watch: load snapshots and KV event batches, with the gateway's block hashes, and replay
from a sequence number after a reconnect."""

from __future__ import annotations

import threading

import grpc
import pytest

from kvtransfer.block_hash import hash_blocks
from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow


class EventCollector:
    """Reads a Worker.Watch stream in a thread (grpc's sync streams block)."""

    def __init__(self, address: str, last_sequence: int = 0):
        self.channel = grpc.insecure_channel(address)
        self.call = worker_pb2_grpc.WorkerStub(self.channel).Watch(worker_pb2.WatchRequest(last_sequence=last_sequence), timeout=120)
        self.events: list[worker_pb2.WorkerEvent] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except grpc.RpcError:
            pass  # cancelled by close()

    def batches(self) -> list[worker_pb2.KVEventBatch]:
        return [e.kv_events for e in list(self.events) if e.HasField("kv_events")]

    def loads(self) -> list[worker_pb2.LoadSnapshot]:
        return [e.load for e in list(self.events) if e.HasField("load")]

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=10)
        self.channel.close()


def stored_hashes(batches) -> set[int]:
    return {h for b in batches for ev in b.events if ev.HasField("stored") for h in ev.stored.block_hashes}


def test_watch_streams_kv_events_with_the_gateways_hashes_and_replays_after_reconnect(cluster, gateway_channel):
    address = cluster.service("decode-0").address
    listing = gateway_pb2_grpc.GatewayStub(gateway_channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
    layout = next(w.registration.kv_layout for w in listing.workers if w.registration.worker_id == "decode-0")

    watcher = EventCollector(address)
    try:
        first_load = wait_for(lambda: watcher.loads(), "the first load snapshot")[0]
        assert first_load.worker_id == "decode-0" and first_load.num_total_blocks > 0
        ids = [1000 + i for i in range(5 * layout.block_size + 3)]  # 5 full blocks, nothing cached yet
        request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(max_tokens=2))
        list(gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(request, timeout=60))
        # a second, different prompt: at least two batches, so a replay from the one before the last exists
        other = gateway_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=[2000 + i for i in range(2 * layout.block_size)]), sampling=common_pb2.SamplingParams(max_tokens=1)
        )
        list(gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(other, timeout=60))
        expected = set(hash_blocks(ids, layout.block_size, layout.model_id, None))
        assert len(expected) == 5
        wait_for(lambda: expected <= stored_hashes(watcher.batches()), "the prompt's blocks in the KV event stream")
        wait_for(lambda: len([b for b in watcher.batches() if not b.snapshot]) >= 2, "the second prompt's batch")

        # the gateway's own prefix index learned the same blocks from its Watch stream
        def indexed():
            reply = gateway_pb2_grpc.GatewayStub(gateway_channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
            return next(w.num_indexed_blocks for w in reply.workers if w.registration.worker_id == "decode-0") >= len(expected)

        wait_for(indexed, "the gateway's prefix index to hold the prompt's blocks on decode-0")
        seqs = [b.sequence for b in watcher.batches() if not b.snapshot]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"sequence numbers must be consecutive: {seqs}"
        assert any(load.num_requests_running == 1 for load in watcher.loads()), "a load snapshot while the request ran"
    finally:
        watcher.close()

    # a consumer that saw up to the batch before the last one gets exactly the missed batches
    last = watcher.batches()[-1]
    again = EventCollector(address, last_sequence=last.sequence - 1)
    try:
        replay = wait_for(lambda: again.batches(), "the replayed batch")
        assert not replay[0].snapshot and replay[0] == last
        assert again.loads(), "the current load follows the catch-up"
    finally:
        again.close()

    # one that knows nothing gets a snapshot holding every cached block
    fresh = EventCollector(address, last_sequence=0)
    try:
        snapshot = wait_for(lambda: fresh.batches(), "the snapshot")[0]
        assert snapshot.snapshot and expected <= stored_hashes([snapshot])
    finally:
        fresh.close()
