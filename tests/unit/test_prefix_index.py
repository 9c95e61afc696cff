"""PrefixIndex: the gateway's block hash → worker map, fed by KV event batches, queried by match()."""

from __future__ import annotations

import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gateway.prefix_index import PrefixIndex
from kvtransfer.block_hash import hash_blocks
from protos.tandem.v1 import worker_pb2
from services.common.kv_event_log import KVEventLog


def stored(*hashes, parent=None):
    body = worker_pb2.BlocksStored(block_hashes=hashes)
    if parent is not None:
        body.parent_hash = parent
    return worker_pb2.KVEvent(stored=body)


def removed(*hashes):
    return worker_pb2.KVEvent(removed=worker_pb2.BlocksRemoved(block_hashes=hashes))


def cleared():
    return worker_pb2.KVEvent(cleared=worker_pb2.AllBlocksCleared())


def batch(sequence, *events, snapshot=False):
    return worker_pb2.KVEventBatch(sequence=sequence, snapshot=snapshot, events=events)


def feed(index, worker_id, *event_lists):
    """Apply one batch per event list, numbered from the worker's next sequence."""
    for events in event_lists:
        assert index.apply(worker_id, batch(index.sequence(worker_id) + 1, *events))


def state(index):
    return {
        "held": {w: index.held(w) for w in index._workers},
        "seq": {w: index.sequence(w) for w in index._workers},
        "stats": (index.num_entries, index.num_blocks, index.num_workers, index.num_evicted),
    }


# ---- apply: event semantics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "batches, expected_held",
    [
        ([[stored(1, 2, 3)]], {1, 2, 3}),
        ([[stored(1, 2, 3)], [stored(4, parent=3)]], {1, 2, 3, 4}),
        ([[stored(1, 2, 3)], [removed(2)]], {1, 3}),
        ([[stored(1, 2, 3)], [removed(2, 99)]], {1, 3}),  # removing an unknown hash is harmless
        ([[removed(1)]], set()),
        ([[stored(1, 2)], [cleared()]], set()),
        ([[stored(1, 2)], [cleared()], [stored(7)]], {7}),
        ([[stored(1, 2), removed(1), stored(5)]], {2, 5}),  # events inside one batch apply in order
        ([[stored(1), cleared(), stored(4)]], {4}),
        ([[stored(1, 1, 2)], [stored(2, 3)]], {1, 2, 3}),  # storing a held hash again is a no-op
        ([[]], set()),
    ],
)
def test_events_update_the_worker_set(batches, expected_held):
    index = PrefixIndex()
    feed(index, "w", *batches)
    assert index.held("w") == expected_held
    assert index.sequence("w") == len(batches)
    assert index.num_entries == len(expected_held)
    assert index.num_workers == 1  # a worker is known once a batch applied, even an empty one
    index.check_integrity()


def test_stats_count_entries_blocks_and_workers():
    index = PrefixIndex()
    feed(index, "a", [stored(1, 2, 3)])
    feed(index, "b", [stored(1, 2, 9)])
    assert (index.num_entries, index.num_blocks, index.num_workers) == (6, 4, 2)
    feed(index, "a", [removed(1)])
    assert (index.num_entries, index.num_blocks) == (5, 4)
    feed(index, "b", [removed(1)])
    assert (index.num_entries, index.num_blocks) == (4, 3)
    index.check_integrity()


def test_snapshot_replaces_what_was_known():
    index = PrefixIndex()
    feed(index, "w", [stored(1, 2, 3)], [stored(4)])
    feed(index, "other", [stored(2, 3)])
    assert index.apply("w", batch(9, stored(3, 4, 5), snapshot=True))
    assert index.held("w") == {3, 4, 5}
    assert index.held("other") == {2, 3}
    assert (index.num_held("w"), index.num_held("other"), index.num_held("nobody")) == (3, 2, 0)
    assert index.sequence("w") == 9
    assert index.apply("w", batch(10, removed(5)))
    assert index.held("w") == {3, 4}
    index.check_integrity()


@pytest.mark.parametrize(
    "sequence",
    [1, 2, 4, 10],  # a replay of one already applied, a duplicate of the last, a gap, a far jump
)
def test_out_of_order_batch_is_rejected_and_changes_nothing(sequence):
    index = PrefixIndex()
    feed(index, "w", [stored(1, 2)], [stored(3)])
    feed(index, "other", [stored(7)])
    before = state(index)
    assert not index.apply("w", batch(sequence, cleared(), stored(99)))
    assert state(index) == before
    index.check_integrity()


def test_first_batch_of_an_unknown_worker_must_be_sequence_one_or_a_snapshot():
    index = PrefixIndex()
    assert not index.apply("w", batch(5, stored(1)))
    assert index.num_workers == 0 and index.sequence("w") == 0
    assert index.apply("w", batch(5, stored(1), snapshot=True))
    assert index.held("w") == {1} and index.sequence("w") == 5


def _engine_event(kind, *hashes):
    return SimpleNamespace(kind=kind, block_hashes=hashes, parent_hash=None)


@pytest.mark.parametrize("max_batches", [100, 2])  # the log still has the missed batches / had to snapshot
def test_replay_after_a_gap_converges(max_batches):
    log = KVEventLog(max_batches=max_batches)  # the worker side
    index = PrefixIndex()
    delivered = [log.append([_engine_event("stored", 1, 2, 3)]), log.append([_engine_event("stored", 4)])]
    missed = [log.append([_engine_event("removed", 2)]), log.append([_engine_event("stored", 5, 6)])]
    late = log.append([_engine_event("removed", 1)])
    for b in delivered:
        assert index.apply("w", b)
    assert missed and not index.apply("w", late)  # the gap is noticed; the caller resubscribes
    for b in log.since(index.sequence("w")):
        assert index.apply("w", b)
    assert index.held("w") == log.held == {3, 4, 5, 6}
    assert index.sequence("w") == log.sequence
    index.check_integrity()


def test_remove_worker_forgets_everything_and_its_slot_is_reused_clean():
    index = PrefixIndex()
    feed(index, "a", [stored(1, 2, 3)])
    feed(index, "b", [stored(1, 2)])
    index.remove_worker("a")
    index.remove_worker("never-seen")  # harmless
    assert index.held("a") == set() and index.sequence("a") == 0
    assert (index.num_entries, index.num_blocks, index.num_workers) == (2, 2, 1)
    assert index.match([1, 2, 3]) == {"b": 2}
    feed(index, "c", [stored(9)])  # takes the freed slot: must not inherit a's blocks
    assert index.match([1, 2, 3]) == {"b": 2, "c": 0}
    index.check_integrity()


def test_worker_restart_starts_again_from_a_snapshot_at_sequence_one():
    index = PrefixIndex()
    feed(index, "w", [stored(1, 2)], [stored(3)], [stored(4)])
    assert not index.apply("w", batch(1, stored(8)))  # a restarted worker's fresh stream...
    assert index.apply("w", batch(1, stored(8), snapshot=True))  # ...arrives as a snapshot
    assert index.held("w") == {8} and index.sequence("w") == 1
    assert index.apply("w", batch(2, stored(9, parent=8)))
    assert index.held("w") == {8, 9}
    assert index.apply("w", batch(0, snapshot=True))  # restarted with an empty cache
    assert index.held("w") == set() and index.sequence("w") == 0
    index.check_integrity()


# ---- match --------------------------------------------------------------------------------------

PROMPT = [11, 12, 13, 14, 15, 16]
HOLDINGS = {
    "full": PROMPT,
    "half": PROMPT[:3],
    "hole": [11, 13, 14, 15],  # holds blocks 2-4 but not 1: counts only block 0
    "no-root": PROMPT[1:],  # everything but block 0: counts nothing
    "elsewhere": [91, 92],
    "empty": [],
}


@pytest.fixture
def matched_index():
    index = PrefixIndex()
    for worker_id, hashes in HOLDINGS.items():
        feed(index, worker_id, [stored(*hashes)] if hashes else [])
    return index


@pytest.mark.parametrize(
    "prompt, worker_ids, expected",
    [
        (PROMPT, None, {"full": 6, "half": 3, "hole": 1, "no-root": 0, "elsewhere": 0, "empty": 0}),
        (PROMPT[:2], None, {"full": 2, "half": 2, "hole": 1, "no-root": 0, "elsewhere": 0, "empty": 0}),
        (PROMPT + [17], None, {"full": 6, "half": 3, "hole": 1, "no-root": 0, "elsewhere": 0, "empty": 0}),
        ([], None, dict.fromkeys(HOLDINGS, 0)),
        ([99], None, dict.fromkeys(HOLDINGS, 0)),
        (PROMPT, ["half", "no-root"], {"half": 3, "no-root": 0}),
        (PROMPT, ["full", "unknown"], {"full": 6, "unknown": 0}),
        (PROMPT, ["unknown"], {"unknown": 0}),
        (PROMPT, [], {}),
        ([], ["full", "unknown"], {"full": 0, "unknown": 0}),
        (PROMPT, iter(["hole", "half"]), {"hole": 1, "half": 3}),  # any iterable
    ],
)
def test_match_counts_leading_blocks_per_worker(matched_index, prompt, worker_ids, expected):
    assert matched_index.match(prompt, worker_ids) == expected


def test_match_does_not_mutate(matched_index):
    before = state(matched_index)
    matched_index.match(PROMPT)
    matched_index.match(PROMPT, ["half", "unknown"])
    assert state(matched_index) == before


def test_match_with_many_workers_sharing_a_prefix():
    # past 8 workers dropping out at one block, match decodes the mask differently: same answer
    index = PrefixIndex()
    expected = {}
    for i in range(300):
        depth = i % 7
        feed(index, f"w{i}", [stored(*PROMPT[:depth])] if depth else [])
        expected[f"w{i}"] = depth
    assert index.match(PROMPT) == expected
    index.check_integrity()


# ---- the bound ----------------------------------------------------------------------------------


def test_over_the_bound_the_storing_worker_loses_its_oldest_entries():
    index = PrefixIndex(max_entries=5)
    feed(index, "a", [stored(1, 2, 3)])
    feed(index, "b", [stored(10, 11)])
    assert index.num_evicted == 0
    feed(index, "a", [stored(4)])
    assert index.held("a") == {2, 3, 4} and index.held("b") == {10, 11}
    feed(index, "b", [stored(12)])
    assert index.held("a") == {2, 3, 4} and index.held("b") == {11, 12}
    feed(index, "a", [stored(5, 6)])
    assert index.held("a") == {4, 5, 6} and index.held("b") == {11, 12}
    assert (index.num_evicted, index.num_entries) == (4, 5)
    index.check_integrity()


def test_a_worker_below_its_fair_share_takes_from_the_largest():
    index = PrefixIndex(max_entries=6)
    feed(index, "a", [stored(1, 2, 3, 4, 5)])
    feed(index, "b", [stored(10)])
    feed(index, "c", [stored(20, 21)])  # fair share is 2: c holds none, so a gives up its oldest
    assert index.held("a") == {3, 4, 5}
    assert index.held("b") == {10} and index.held("c") == {20, 21}
    assert (index.num_evicted, index.num_entries) == (2, 6)
    index.check_integrity()


def test_more_workers_than_the_bound_still_makes_room():
    index = PrefixIndex(max_entries=2)
    feed(index, "a", [stored(1)])
    feed(index, "b", [stored(2)])
    feed(index, "c", [stored(3)])  # fair share rounds to 0 and c holds nothing: take from another
    assert index.held("a") == set() and index.held("b") == {2} and index.held("c") == {3}
    feed(index, "c", [stored(4)])
    assert index.held("c") == {4} and index.num_evicted == 2
    index.check_integrity()


def test_a_chain_longer_than_the_bound_keeps_its_newest_blocks():
    index = PrefixIndex(max_entries=4)
    feed(index, "other", [stored(99)])
    feed(index, "w", [stored(*range(1, 11))])
    assert index.held("w") == {7, 8, 9, 10} and index.held("other") == set()
    assert (index.num_evicted, index.num_entries) == (7, 4)
    index.check_integrity()


def test_snapshot_under_the_bound_keeps_held_entries_in_their_age_order():
    index = PrefixIndex(max_entries=4)
    feed(index, "w", [stored(1, 2, 3)])
    assert index.apply("w", batch(5, stored(2, 3, 4, 5), snapshot=True))  # 1 goes: it is not in the snapshot
    assert index.held("w") == {2, 3, 4, 5} and index.num_evicted == 0
    feed(index, "w", [stored(6)])  # 2 is the oldest entry left
    assert index.held("w") == {3, 4, 5, 6} and index.num_evicted == 1
    index.check_integrity()


def test_constructor_rejects_a_bound_below_one():
    with pytest.raises(ValueError):
        PrefixIndex(max_entries=0)


# ---- check_integrity ----------------------------------------------------------------------------


def _corrupt_missing_holder(index):
    del index._holders[1]


def _corrupt_extra_holder_bit(index):
    index._holders[1] |= 1 << 40  # a free slot


def _corrupt_holder_names_a_worker_without_the_hash(index):
    index._holders[99] = index._workers["a"].bit


def _corrupt_empty_mask(index):
    index._holders[77] = 0


def _corrupt_worker_map(index):
    del index._workers["a"].hashes[2]


def _corrupt_count(index):
    index.num_entries += 1


def _corrupt_bound(index):
    index.max_entries = 2


def _corrupt_slot_table(index):
    index._slot_ids[index._workers["a"].slot] = "b"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_missing_holder, "index does not say so"),
        (_corrupt_extra_holder_bit, "free slot"),
        (_corrupt_holder_names_a_worker_without_the_hash, "worker's map does not"),
        (_corrupt_empty_mask, "empty holder mask"),
        (_corrupt_worker_map, "worker's map does not"),
        (_corrupt_count, "num_entries"),
        (_corrupt_bound, "over the bound"),
        (_corrupt_slot_table, "slot"),
    ],
)
def test_check_integrity_catches_corruption(corrupt, message):
    index = PrefixIndex()
    feed(index, "a", [stored(1, 2, 3)])
    feed(index, "b", [stored(1, 5)])
    index.check_integrity()
    corrupt(index)
    with pytest.raises(AssertionError, match=message):
        index.check_integrity()


# ---- property: a random event stream against a reference model -----------------------------------


def _brute_force_match(reference, prompt, worker_ids):
    out = {}
    for w in reference if worker_ids is None else worker_ids:
        held = reference.get(w, set())
        n = 0
        while n < len(prompt) and prompt[n] in held:
            n += 1
        out[w] = n
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_event_streams_match_a_reference_model(seed):
    rng = random.Random(seed)
    chains = [[rng.getrandbits(64) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    chains += [c[: rng.randint(1, len(c))] + [rng.getrandbits(64)] for c in chains[:3]]  # shared prefixes
    universe = sorted({h for c in chains for h in c})
    workers = [f"w{i}" for i in range(5)]
    index = PrefixIndex()
    reference: dict[str, set[int]] = {}  # known workers → held hashes
    sequences: dict[str, int] = {}

    def random_event(held):
        r = rng.random()
        if r < 0.55:
            chain = rng.choice(chains)
            start = rng.randrange(len(chain))
            hashes = chain[start : rng.randint(start + 1, len(chain))]
            held.update(hashes)
            return stored(*hashes, parent=chain[start - 1] if start else None)
        if r < 0.95:
            hashes = rng.sample(universe, rng.randint(1, 4))
            held.difference_update(hashes)
            return removed(*hashes)
        held.clear()
        return cleared()

    for _ in range(600):
        w = rng.choice(workers)
        r = rng.random()
        if r < 0.05:
            index.remove_worker(w)
            reference.pop(w, None)
            sequences.pop(w, None)
        elif r < 0.12:
            snap = set(rng.sample(universe, rng.randint(0, 10)))
            seq = rng.randint(0, 50)
            assert index.apply(w, batch(seq, stored(*sorted(snap)), snapshot=True))
            reference[w], sequences[w] = snap, seq
        elif r < 0.18:
            before = state(index)
            assert not index.apply(w, batch(sequences.get(w, 0) + rng.choice([0, 2, 3]), stored(universe[0])))
            assert state(index) == before
        else:
            held = set(reference.get(w, set()))
            events = [random_event(held) for _ in range(rng.randint(0, 4))]
            seq = sequences.get(w, 0) + 1
            assert index.apply(w, batch(seq, *events))
            reference[w], sequences[w] = held, seq

        assert {x: index.held(x) for x in workers} == {x: reference.get(x, set()) for x in workers}
        assert {x: index.sequence(x) for x in workers} == {x: sequences.get(x, 0) for x in workers}
        assert index.num_entries == sum(map(len, reference.values()))
        assert index.num_blocks == len(set().union(*reference.values()))
        assert index.num_workers == len(reference)
        index.check_integrity()
        for prompt in (rng.choice(chains), rng.sample(universe, 3), []):
            assert index.match(prompt) == _brute_force_match(reference, prompt, None)
            ids = rng.sample(workers + ["ghost"], rng.randint(0, 6))
            assert index.match(prompt, ids) == _brute_force_match(reference, prompt, ids)


@pytest.mark.parametrize("seed", range(3))
def test_random_stream_under_a_tight_bound_only_forgets(seed):
    rng = random.Random(seed)
    index = PrefixIndex(max_entries=20)
    reference: dict[str, set[int]] = {}
    for _ in range(400):
        w = f"w{rng.randrange(4)}"
        hashes = [rng.randrange(60) for _ in range(rng.randint(1, 8))]
        held = reference.setdefault(w, set())
        if rng.random() < 0.7:
            held.update(hashes)
            feed(index, w, [stored(*hashes)])
        else:
            held.difference_update(hashes)
            feed(index, w, [removed(*hashes)])
        index.check_integrity()
        assert index.num_entries <= 20
        for x, ref in reference.items():
            assert index.held(x) <= ref  # a bounded index errs only by forgetting
    assert index.num_evicted > 0


# ---- shared hashing with the workers ------------------------------------------------------------


def test_gateway_hashes_match_what_a_worker_publishes():
    rng = random.Random(7)
    tokens = [rng.randrange(50_000) for _ in range(2_000)]
    prompt_hashes = hash_blocks(tokens, 16, "m", None)  # the gateway's side
    assert len(prompt_hashes) == 125

    # the worker's side: it stored the prompt's KV in two steps, the second chained to the first
    first = hash_blocks(tokens[:640], 16, "m", None)
    rest = hash_blocks(tokens[640:], 16, "m", None, parent_hash=first[-1])
    index = PrefixIndex()
    feed(index, "worker", [stored(*first)], [stored(*rest, parent=first[-1])])
    feed(index, "other-model", [stored(*hash_blocks(tokens, 16, "other", None))])

    assert index.match(prompt_hashes) == {"worker": 125, "other-model": 0}
    follow_up = hash_blocks(tokens[:1_000] + [1, 2, 3] * 100, 16, "m", None)  # shares 62 full blocks
    assert index.match(follow_up) == {"worker": 62, "other-model": 0}


def test_module_does_not_import_torch():
    code = "import sys, gateway.prefix_index; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, "gateway.prefix_index imports torch" if result.returncode == 3 else result.stderr
