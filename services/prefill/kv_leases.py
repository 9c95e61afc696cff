"""KVLeases: a prefill worker's prefilled prompts, each held for one decode worker under a lease.

    Prefill ──grant(pinned, decode address)──► lease {request id → token, timer}, blocks exposed
                                                to the transport for that decode worker only
       decode pulls (token) ──► transport on_pull_done ──► release ──► engine.release_pinned
       gateway ReleaseKV(token) ───────────────────────► release        (request ended first)
       timer fires after kv_lease_seconds ─────────────► release        (nobody came)

Whichever comes first releases the lease; the others find nothing. The token is random, single
use, and compared in constant time. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

TOKEN_BYTES = 16


@dataclass
class Lease:
    request_id: str
    token: bytes
    block_ids: tuple[int, ...]
    expires_at: float  # time.time()
    timer: asyncio.TimerHandle  # or what an injected call_later returns: anything with cancel()


class KVLeases:
    def __init__(self, engine, transport, lease_seconds: float, on_expired=None, *, clock=time.time, call_later=None):
        """`clock` (wall seconds, for the transport's expiry) and `call_later(delay, fn, *args)` (the
        expiry timer; default: the running loop's) are injected by tests, which then step time
        instead of sleeping through it."""
        self._clock, self._call_later = clock, call_later
        self._engine = engine  # AsyncEngine: release_pinned(request_id)
        self._on_expired = on_expired  # called once per expired lease (a metric)
        self._transport = transport  # KVTransportServer: expose / revoke
        self.lease_seconds = lease_seconds
        self._leases: dict[str, Lease] = {}
        self._by_token: dict[bytes, str] = {}
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, pinned, peer_address: bytes) -> Lease:
        """Hold `pinned` (a PinnedKV) for one pull by the decode worker whose UCX client address is
        `peer_address`; returns the lease with its token. Mutates."""
        call_later = self._call_later or asyncio.get_running_loop().call_later
        token = secrets.token_bytes(TOKEN_BYTES)
        rid = pinned.request_id
        lease = Lease(rid, token, pinned.block_ids, self._clock() + self.lease_seconds, call_later(self.lease_seconds, self._expire, rid))
        self._leases[rid] = lease
        self._by_token[token] = rid
        self._transport.expose(token, list(pinned.block_ids), lease.expires_at, peer_address=peer_address)
        return lease

    def pull_done(self, token: bytes, ok: bool) -> None:
        """The transport finished a pull with this token (ok or not): it reads the blocks no more,
        and the token is spent either way, so the lease ends."""
        rid = self._by_token.get(bytes(token))
        if rid is not None:
            self._end(rid, "pulled")

    def release(self, request_id: str, token: bytes) -> bool:
        """The holder of the handle gives it up. False when the token is wrong or the lease is gone."""
        lease = self._leases.get(request_id)
        if lease is None or not hmac.compare_digest(lease.token, token):
            return False
        return self._end(request_id, "released")

    def _expire(self, request_id: str) -> None:
        if self._end(request_id, "expired"):
            self.num_expired += 1
            if self._on_expired is not None:
                self._on_expired()
            log.info("KV lease of %s expired after %.0fs without a pull; blocks freed", request_id, self.lease_seconds)

    def _end(self, request_id: str, why: str) -> bool:
        lease = self._leases.pop(request_id, None)
        if lease is None:
            return False
        del self._by_token[lease.token]
        lease.timer.cancel()
        if why != "pulled":
            self._transport.revoke(lease.token)
        self._engine.release_pinned(request_id)
        return True

    def close(self) -> None:
        """Free every held prompt (shutdown). Mutates."""
        for rid in list(self._leases):
            self._end(rid, "closed")

    def check_integrity(self) -> None:
        assert len(self._by_token) == len(self._leases), "tokens and leases out of step"
        now = self._clock()
        for rid, lease in self._leases.items():
            assert lease.request_id == rid, f"lease filed under {rid} belongs to {lease.request_id}"
            assert self._by_token.get(lease.token) == rid, f"lease of {rid} is not findable by its token"
            assert lease.expires_at > now - 5, f"lease of {rid} is long past its expiry and still held"
