"""KVLeases: whichever of pull, release or expiry comes first frees a prefilled prompt, once."""

from __future__ import annotations

from services.engine.kv_handoff import PinnedKV
from services.prefill.kv_leases import KVLeases


class FakeEngine:
    def __init__(self):
        self.released: list[str] = []

    def release_pinned(self, request_id: str) -> None:
        self.released.append(request_id)


class FakeTransport:
    def __init__(self):
        self.exposed: dict[bytes, list[int]] = {}
        self.peers: dict[bytes, bytes] = {}
        self.revoked: list[bytes] = []

    def expose(self, token, block_ids, expires_at, *, peer_address) -> None:
        self.exposed[token] = block_ids
        self.peers[token] = peer_address

    def revoke(self, token) -> None:
        self.revoked.append(token)


class SteppedTime:
    """The leases' clock and timers, advanced by the test instead of slept through."""

    def __init__(self):
        self.now = 1_000.0
        self._timers: list[list] = []  # [due, fn, args, cancelled]

    def clock(self) -> float:
        return self.now

    def call_later(self, delay, fn, *args):
        timer = [self.now + delay, fn, args, False]
        self._timers.append(timer)

        class Handle:
            def cancel(self_inner):
                timer[3] = True

        return Handle()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in sorted(self._timers, key=lambda t: t[0]):
            if timer[0] <= self.now and not timer[3]:
                timer[3] = True
                timer[1](*timer[2])


def setup(lease_seconds: float = 30.0, time_source: SteppedTime | None = None):
    engine, transport = FakeEngine(), FakeTransport()
    expired = []
    timing = {"clock": time_source.clock, "call_later": time_source.call_later} if time_source else {}
    return engine, transport, KVLeases(engine, transport, lease_seconds, on_expired=lambda: expired.append(1), **timing), expired


PEER = b"decode-ucx-address"


def pinned(rid: str) -> PinnedKV:
    return PinnedKV(rid, (4, 5, 6), (111, 222), 40)


async def test_pull_ends_the_lease_without_revoking():
    engine, transport, leases, _ = setup()
    lease = leases.grant(pinned("a"), PEER)
    assert transport.exposed[lease.token] == [4, 5, 6] and len(lease.token) == 16
    assert transport.peers[lease.token] == PEER  # exposed for that decode worker only
    leases.pull_done(lease.token, ok=True)
    assert engine.released == ["a"] and transport.revoked == [] and len(leases) == 0
    leases.pull_done(lease.token, ok=True)  # a second notification finds nothing
    assert not leases.release("a", lease.token)
    assert engine.released == ["a"]
    leases.check_integrity()


async def test_failed_pull_also_ends_the_lease():
    engine, _, leases, _ = setup()
    lease = leases.grant(pinned("a"), PEER)
    leases.pull_done(lease.token, ok=False)  # the token is spent either way
    assert engine.released == ["a"]


async def test_release_needs_the_right_token():
    engine, transport, leases, _ = setup()
    lease = leases.grant(pinned("a"), PEER)
    assert not leases.release("a", b"\0" * 16)
    assert not leases.release("b", lease.token)
    assert engine.released == []
    assert leases.release("a", lease.token)
    assert engine.released == ["a"] and transport.revoked == [lease.token]
    leases.check_integrity()


async def test_expiry_frees_and_revokes():
    time_source = SteppedTime()
    engine, transport, leases, expired = setup(lease_seconds=30, time_source=time_source)
    lease = leases.grant(pinned("a"), PEER)
    other = leases.grant(pinned("b"), PEER)
    leases.pull_done(other.token, ok=True)
    time_source.advance(29.9)
    assert engine.released == ["b"] and len(leases) == 1  # not yet
    leases.check_integrity()
    time_source.advance(0.2)
    assert engine.released == ["b", "a"] and transport.revoked == [lease.token]
    assert expired == [1] and leases.num_expired == 1 and len(leases) == 0


async def test_close_frees_everything():
    engine, transport, leases, _ = setup()
    tokens = [leases.grant(pinned(r), PEER).token for r in "abc"]
    leases.close()
    assert sorted(engine.released) == ["a", "b", "c"] and sorted(transport.revoked) == sorted(tokens)
    leases.check_integrity()
