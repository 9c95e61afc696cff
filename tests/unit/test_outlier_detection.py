"""Outlier detection: consecutive worker failures eject a worker for a growing window, capped so
that never every worker is out; a success resets the count. Table-driven, on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from gateway.outlier_detection import OutlierDetectionConfig, OutlierDetector
from gateway.scheduling.base import RequestContext
from gateway.scheduling.health_filter import HealthFilter

OK, UNAVAILABLE, INTERNAL, UNKNOWN = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN
INVALID, EXHAUSTED, DEADLINE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def worker(key: str, role: str = "decode"):
    return SimpleNamespace(key=key, worker_id=key, role=role, ejected_until=0.0, connected=True, retired=False)


def detector(clock, ejections=None, **config):
    on_eject = None if ejections is None else (lambda h, s: ejections.append((h.key, s)))
    return OutlierDetector(OutlierDetectionConfig(**config), on_eject=on_eject, clock=clock)


@pytest.mark.parametrize(
    "codes, ejected",
    [
        ([UNAVAILABLE, UNAVAILABLE, UNAVAILABLE], True),
        ([INTERNAL, UNKNOWN, UNAVAILABLE], True),  # any worker failure counts
        ([UNAVAILABLE, UNAVAILABLE], False),  # below the threshold
        ([UNAVAILABLE, UNAVAILABLE, OK, UNAVAILABLE, UNAVAILABLE], False),  # a success resets the count
        ([UNAVAILABLE, INVALID, UNAVAILABLE, UNAVAILABLE], False),  # an answer about the request is a success
        ([EXHAUSTED, EXHAUSTED, EXHAUSTED], False),  # the request's fault, not the worker's
        ([DEADLINE, DEADLINE, DEADLINE], False),  # the client's deadline
    ],
)
def test_consecutive_failures_eject(codes, ejected):
    clock = Clock()
    a, b = worker("a"), worker("b")
    d = detector(clock)
    for code in codes:
        d.record(a, code, [a, b])
    assert (a.ejected_until > clock.now) is ejected
    assert b.ejected_until == 0.0


@pytest.mark.parametrize(
    "num_workers, percent, num_ejectable",
    [
        (1, 100, 0),  # never the only worker
        (2, 50, 1),
        (2, 100, 1),  # never every worker
        (3, 50, 1),
        (4, 50, 2),
        (10, 10, 1),
        (3, 10, 1),  # at least one, as Envoy
        (4, 0, 0),  # 0% = never eject
    ],
)
def test_ejection_cap(num_workers, percent, num_ejectable):
    clock = Clock()
    workers = [worker(f"w{i}") for i in range(num_workers)]
    d = detector(clock, max_ejection_percent=percent)
    for w in workers:
        for _ in range(3):
            d.record(w, UNAVAILABLE, workers)
    assert sum(w.ejected_until > clock.now for w in workers) == num_ejectable


def test_the_cap_counts_each_role_apart():
    clock = Clock()
    decode = [worker("d0"), worker("d1")]
    prefill = [worker("p0", "prefill"), worker("p1", "prefill")]
    d = detector(clock)
    for w, peers in ((decode[0], decode), (prefill[0], prefill)):
        for _ in range(3):
            d.record(w, UNAVAILABLE, peers)
    assert decode[0].ejected_until > clock.now and prefill[0].ejected_until > clock.now


@pytest.mark.parametrize(
    "base, maximum, windows",
    [
        (5.0, 60.0, [5.0, 10.0, 15.0, 20.0]),  # the n-th ejection lasts n × base
        (5.0, 12.0, [5.0, 10.0, 12.0, 12.0]),  # up to the max
    ],
)
def test_repeated_ejections_grow_up_to_the_max(base, maximum, windows):
    clock = Clock()
    a, b = worker("a"), worker("b")
    ejections = []
    d = detector(clock, ejections, base_ejection_seconds=base, max_ejection_seconds=maximum)
    for _ in windows:
        for _ in range(3):
            d.record(a, UNAVAILABLE, [a, b])
        clock.now = a.ejected_until  # the window ends; it is routable again, and fails again
    assert [s for _, s in ejections] == windows


def test_failures_while_ejected_do_not_extend_the_window():
    clock = Clock()
    a, b = worker("a"), worker("b")
    d = detector(clock)
    for _ in range(3):
        d.record(a, UNAVAILABLE, [a, b])
    until = a.ejected_until
    for _ in range(6):  # requests already in flight there when it was ejected
        d.record(a, UNAVAILABLE, [a, b])
    assert a.ejected_until == until


def test_a_long_healthy_spell_restarts_the_backoff_and_forgets_the_worker():
    clock = Clock()
    a, b = worker("a"), worker("b")
    ejections = []
    d = detector(clock, ejections, base_ejection_seconds=5.0, max_ejection_seconds=60.0)
    for _ in range(3):
        d.record(a, UNAVAILABLE, [a, b])
    clock.now = a.ejected_until + 1.0
    d.record(a, OK, [a, b])  # soon after: the backoff is remembered
    assert d.num_tracked() == 1
    clock.now = a.ejected_until + 60.0
    d.record(a, OK, [a, b])
    assert d.num_tracked() == 0
    for _ in range(3):
        d.record(a, UNAVAILABLE, [a, b])
    assert [s for _, s in ejections] == [5.0, 5.0]


def test_off_when_the_threshold_is_zero():
    clock = Clock()
    a, b = worker("a"), worker("b")
    d = detector(clock, consecutive_failures=0)
    for _ in range(10):
        d.record(a, UNAVAILABLE, [a, b])
    assert a.ejected_until == 0.0 and d.num_tracked() == 0


@pytest.mark.parametrize(
    "config",
    [dict(consecutive_failures=-1), dict(base_ejection_seconds=0), dict(base_ejection_seconds=70, max_ejection_seconds=60), dict(max_ejection_percent=101)],
)
def test_bad_settings_are_refused_by_name(config):
    with pytest.raises(ValueError, match="outlier"):
        OutlierDetectionConfig(**config)


def test_the_health_filter_drops_an_ejected_worker_until_its_window_ends():
    import time

    a, b = worker("a"), worker("b")
    a.ejected_until = time.monotonic() + 60
    assert [w.key for w in HealthFilter().filter(RequestContext("r", 1), [a, b])] == ["b"]
    a.ejected_until = time.monotonic() - 1
    assert [w.key for w in HealthFilter().filter(RequestContext("r", 1), [a, b])] == ["a", "b"]
