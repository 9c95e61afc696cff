"""SimHost: a simulated worker's side of Worker.Watch — the real WatchHub (load snapshots,
KVEventLog batches, subscriber queues, exactly as a real worker publishes them), fed by the
SimEngine's observer, plus the check that the event log's view of the held blocks is the cache's.
The Worker service itself is the real one (services/common/worker_servicer.py). Event-loop only.
"""

from __future__ import annotations

from services.common.watch_hub import WatchHub

from .engine import SimEngine


class SimHost(WatchHub):
    """One simulated worker's engine, event log and Watch subscribers."""

    def __init__(self, worker_id: str, engine: SimEngine, max_batches: int = 1024):
        super().__init__(worker_id, max_batches)
        self.engine = engine
        self.stats = engine.stats()
        engine.set_observer(self.publish)

    def check_integrity(self) -> None:
        """The engine and cache invariants, the event log's, and that the log's view of the held
        blocks is the cache's (what a consumer replaying every batch would hold). Does not mutate."""
        self.engine.check_integrity()
        self.kv_log.check_integrity()
        cache = self.engine.cache
        if not cache.has_events:  # between publication and the next change, the two must agree
            held = cache.held_hashes()
            assert self.kv_log.held == held, (
                f"the KV event log holds {len(self.kv_log.held)} hashes, the cache {len(held)} "
                f"({len(self.kv_log.held - held)} only in the log, {len(held - self.kv_log.held)} only in the cache)"
            )
