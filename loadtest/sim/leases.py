"""SimLeases: a simulated prefill worker's prefilled prompts, each held for one decode worker.

    Prefill ──grant(pinned)──► lease {request id → one-time token, expiry timer}
       decode worker's simulated pull ends ──► ReleaseKV(token) ──► release ──► engine.release_pinned
       gateway ReleaseKV(token) (request over) ──────────────────► release   (finds nothing if pulled)
       timer fires after lease_seconds ──────────────────────────► release   (nobody came)

services/prefill/kv_leases.py's behaviour without a transport: in a real cluster the decode
worker's UCX pull presents the token and ends the lease; a simulated decode worker does the same
by calling ReleaseKV with the token once its simulated pull time has passed. Whichever comes
first releases the blocks; the token is random, single use and compared in constant time.
Event-loop only.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from dataclasses import dataclass

from .engine import PinnedBlocks, SimEngine

TOKEN_BYTES = 16


@dataclass
class SimLease:
    request_id: str
    token: bytes
    expires_at: float  # time.time()
    timer: asyncio.TimerHandle


class SimLeases:
    def __init__(self, engine: SimEngine, lease_seconds: float):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self._engine = engine
        self.lease_seconds = lease_seconds
        self._leases: dict[str, SimLease] = {}
        self.num_granted = self.num_released = self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, pinned: PinnedBlocks) -> SimLease:
        """Hold `pinned` for one pull; returns the lease with its token and expiry. Mutates."""
        rid = pinned.request_id
        timer = asyncio.get_running_loop().call_later(self.lease_seconds, self._expire, rid)
        lease = SimLease(rid, secrets.token_bytes(TOKEN_BYTES), time.time() + self.lease_seconds, timer)
        self._leases[rid] = lease
        self.num_granted += 1
        return lease

    def release(self, request_id: str, token: bytes) -> bool:
        """The holder of the handle is done with it (pulled, or the request ended). False when the
        token is wrong or the lease already ended. Mutates."""
        lease = self._leases.get(request_id)
        if lease is None or not hmac.compare_digest(lease.token, bytes(token)):
            return False
        self.num_released += 1
        return self._end(request_id)

    def _expire(self, request_id: str) -> None:
        if self._end(request_id):
            self.num_expired += 1

    def _end(self, request_id: str) -> bool:
        lease = self._leases.pop(request_id, None)
        if lease is None:
            return False
        lease.timer.cancel()
        self._engine.release_pinned(request_id)
        return True

    def close(self) -> None:
        """Free every held prompt (shutdown). Mutates."""
        for rid in list(self._leases):
            self._end(rid)

    def check_integrity(self) -> None:
        """Every lease pins its prompt in the engine, and none is long past its expiry. Does not mutate."""
        now = time.time()
        for rid, lease in self._leases.items():
            assert lease.request_id == rid, f"lease filed under {rid} belongs to {lease.request_id}"
            assert rid in self._engine.pinned, f"lease of {rid} holds no pinned blocks in the engine"
            assert lease.expires_at > now - 5, f"lease of {rid} is long past its expiry and still held"
