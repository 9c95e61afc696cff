"""KVEventLog: sequence-numbered KV event batches, replay from a sequence, snapshots when replay is impossible."""

from __future__ import annotations

import random

import pytest

from services.common.kv_event_log import KVEventLog
from services.engine.block_pool import KVEvent


def stored(*hashes, parent=None):
    return KVEvent("stored", block_hashes=tuple(hashes), parent_hash=parent)


def removed(*hashes):
    return KVEvent("removed", block_hashes=tuple(hashes))


def cleared():
    return KVEvent("cleared")


def describe(batch):
    """A batch as plain data: (sequence, snapshot, [(kind, hashes, parent_or_None)])."""
    events = []
    for ev in batch.events:
        kind = _kind(ev)
        body = getattr(ev, kind)
        hashes = tuple(getattr(body, "block_hashes", ()))
        parent = body.parent_hash if kind == "stored" and body.HasField("parent_hash") else None
        events.append((kind, hashes, parent))
    return batch.sequence, batch.snapshot, events


def _kind(ev):
    return ev.WhichOneof("event")


# ---- append -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batches, expected_held",
    [
        ([[stored(1, 2, 3)]], {1, 2, 3}),
        ([[stored(1, 2, 3)], [removed(2)]], {1, 3}),
        ([[stored(1, 2, 3)], [removed(2, 99)]], {1, 3}),  # removing an unknown hash is harmless
        ([[stored(1, 2)], [cleared()]], set()),
        ([[stored(1, 2)], [cleared()], [stored(7)]], {7}),
        ([[stored(1, 2), removed(1), stored(5)]], {2, 5}),  # events inside one batch apply in order
        ([[stored(1), cleared(), stored(4)]], {4}),
        ([[removed(1)]], set()),
    ],
)
def test_append_updates_held_and_numbers_batches(batches, expected_held):
    log = KVEventLog()
    for i, events in enumerate(batches, start=1):
        batch = log.append(events)
        assert batch is not None
        assert batch.sequence == i
        assert not batch.snapshot
        assert len(batch.events) == len(events)
        assert log.sequence == i
    assert log.held == expected_held
    log.check_integrity()


def test_append_translates_each_event_kind():
    log = KVEventLog()
    batch = log.append([stored(10, 11, parent=5), stored(12), removed(10), cleared()])
    assert describe(batch) == (
        1,
        False,
        [("stored", (10, 11), 5), ("stored", (12,), None), ("removed", (10,), None), ("cleared", (), None)],
    )


@pytest.mark.parametrize("parent, has_parent", [(None, False), (0, True), (123, True), (2**64 - 1, True)])
def test_parent_hash_set_only_when_given(parent, has_parent):
    log = KVEventLog()
    batch = log.append([stored(1, parent=parent)])
    body = batch.events[0].stored
    assert body.HasField("parent_hash") is has_parent
    if has_parent:
        assert body.parent_hash == parent


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_input_returns_none_and_keeps_sequence(empty):
    log = KVEventLog()
    log.append([stored(1)])
    assert log.append(empty) is None
    assert log.sequence == 1
    assert log.since(0)[0].sequence == 1
    nxt = log.append([stored(2)])
    assert nxt.sequence == 2, "an empty append must not consume a sequence number"
    log.check_integrity()


def test_unknown_kind_raises_value_error_naming_the_kind():
    log = KVEventLog()
    with pytest.raises(ValueError, match="unknown KV event kind 'evicted'"):
        log.append([KVEvent("evicted", (1,))])


# ---- since: replay ---------------------------------------------------------------------------------


def make_log(n, max_batches=1024):
    log = KVEventLog(max_batches=max_batches)
    for i in range(1, n + 1):
        log.append([stored(i)])
    return log


@pytest.mark.parametrize("n, last", [(5, 1), (5, 2), (5, 4), (2, 1)])
def test_since_replays_exactly_the_missed_batches_in_order(n, last):
    log = make_log(n)
    got = log.since(last)
    assert [b.sequence for b in got] == list(range(last + 1, n + 1))
    assert all(not b.snapshot for b in got)
    assert [tuple(b.events[0].stored.block_hashes) for b in got] == [(i,) for i in range(last + 1, n + 1)]


@pytest.mark.parametrize("n", [0, 1, 5])
def test_since_current_returns_nothing(n):
    log = make_log(n)
    assert log.since(log.sequence) == []


def test_since_does_not_mutate():
    log = make_log(4)
    before = (log.sequence, set(log.held), [b.sequence for b in log._batches])
    log.since(2)
    log.since(0)
    log.since(100)
    assert (log.sequence, set(log.held), [b.sequence for b in log._batches]) == before


# ---- since: snapshot -------------------------------------------------------------------------------


def assert_snapshot(batches, sequence, held):
    assert len(batches) == 1
    (snap,) = batches
    assert snap.snapshot is True
    assert snap.sequence == sequence
    assert len(snap.events) == 1
    assert _kind(snap.events[0]) == "stored"
    assert list(snap.events[0].stored.block_hashes) == sorted(held)
    assert not snap.events[0].stored.HasField("parent_hash")


@pytest.mark.parametrize(
    "n, max_batches, last, expect_snapshot",
    [
        (5, 3, 2, False),  # batches 3,4,5 kept: 2 is exactly the boundary, replay works
        (5, 3, 1, True),  # batch 2 was dropped
        (10, 3, 3, True),
        (10, 3, 7, False),
        (3, 3, 0, True),  # a new consumer with history present
        (5, 1024, 0, True),
        (5, 3, 6, True),  # consumer ahead: the worker restarted
        (5, 3, 1000, True),
    ],
)
def test_since_falls_back_to_a_snapshot(n, max_batches, last, expect_snapshot):
    log = make_log(n, max_batches=max_batches)
    got = log.since(last)
    if expect_snapshot:
        assert_snapshot(got, n, set(range(1, n + 1)))
    else:
        assert [b.sequence for b in got] == list(range(last + 1, n + 1))
        assert not any(b.snapshot for b in got)


def test_restarted_worker_gets_snapshot_with_its_own_sequence():
    old = make_log(20)
    consumer_last = old.sequence
    restarted = KVEventLog()
    restarted.append([stored(30, 31)])
    restarted.append([removed(30), stored(32)])
    assert_snapshot(restarted.since(consumer_last), 2, {31, 32})


def test_snapshot_after_cleared_is_empty_but_still_one_stored_event():
    log = KVEventLog()
    log.append([stored(3, 1, 2)])
    log.append([cleared()])
    assert_snapshot(log.since(0), 2, set())


def test_snapshot_hashes_are_sorted():
    log = KVEventLog()
    log.append([stored(50, 3, 2**63 + 1, 17)])
    snap = log.snapshot()
    assert list(snap.events[0].stored.block_hashes) == [3, 17, 50, 2**63 + 1]


def test_check_integrity_after_many_appends_with_a_small_window():
    log = KVEventLog(max_batches=7)
    rng = random.Random(1)
    for _ in range(500):
        log.append([stored(rng.randrange(100))] if rng.random() < 0.8 else [])
        log.check_integrity()
    assert len(log._batches) == 7
    assert [b.sequence for b in log._batches] == list(range(log.sequence - 6, log.sequence + 1))


def test_check_integrity_detects_a_gap():
    log = make_log(3)
    log._batches[1].sequence = 9
    with pytest.raises(AssertionError, match="not contiguous"):
        log.check_integrity()


# ---- property: a consumer replaying since() always matches held ---------------------------------


class Consumer:
    def __init__(self):
        self.sequence = 0
        self.held: set[int] = set()

    def apply(self, batches):
        for b in batches:
            if b.snapshot:
                self.held = set()
            for ev in b.events:
                kind = _kind(ev)
                if kind == "stored":
                    self.held.update(ev.stored.block_hashes)
                elif kind == "removed":
                    self.held.difference_update(ev.removed.block_hashes)
                elif kind == "cleared":
                    self.held.clear()
                else:  # pragma: no cover
                    raise AssertionError(kind)
            assert b.sequence > self.sequence or b.snapshot
            self.sequence = b.sequence


def random_events(rng, universe=40):
    events = []
    for _ in range(rng.randrange(0, 4)):
        r = rng.random()
        if r < 0.55:
            hashes = tuple(rng.randrange(universe) for _ in range(rng.randrange(1, 4)))
            events.append(stored(*hashes, parent=rng.choice([None, rng.randrange(universe)])))
        elif r < 0.95:
            events.append(removed(*(rng.randrange(universe) for _ in range(rng.randrange(1, 4)))))
        else:
            events.append(cleared())
    return events


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("max_batches", [1, 4, 64])
def test_consumer_replaying_since_always_matches_held(seed, max_batches):
    rng = random.Random(seed)
    log = KVEventLog(max_batches=max_batches)
    consumer = Consumer()
    checkpoints = [(0, set())]  # (sequence, held) the consumer could have persisted
    connected = True
    snapshots = replays = 0
    for _ in range(300):
        log.append(random_events(rng))
        r = rng.random()
        if r < 0.1:
            connected = False  # disconnect: miss batches for a while
        elif r < 0.25:
            connected = True
        elif r < 0.3:
            # reconnect from an older state (e.g. a gateway restored a stale view)
            seq, held = rng.choice(checkpoints)
            consumer.sequence, consumer.held = seq, set(held)
            connected = True
        if connected:
            batches = log.since(consumer.sequence)
            snapshots += sum(b.snapshot for b in batches)
            replays += sum(not b.snapshot for b in batches)
            consumer.apply(batches)
            assert consumer.sequence == log.sequence
            assert consumer.held == log.held
            checkpoints.append((consumer.sequence, set(consumer.held)))
            checkpoints = checkpoints[-30:]
        log.check_integrity()
    consumer.apply(log.since(consumer.sequence))
    assert consumer.sequence == log.sequence
    assert consumer.held == log.held
    assert replays > 0
    if max_batches == 1:
        assert snapshots > 0
