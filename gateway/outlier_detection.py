"""Passive outlier detection: a worker whose calls keep failing leaves routing for a while.

In the style of Envoy's outlier detection (consecutive 5xx, base ejection time, max ejection
percent), driven by the outcomes of the gateway's own calls, so it protects the gateway before
etcd or the Watch stream notice anything (a worker whose engine is broken may keep both alive):

    call fails (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS: the worker, not the request)
        → consecutive failures += 1; at `consecutive_failures` → eject for
          min(base × times ejected, max) seconds, unless the role's ejection cap is reached
    call answers (OK, or a status about the request: INVALID_ARGUMENT, RESOURCE_EXHAUSTED...)
        → consecutive failures = 0; a success a whole `max_ejection_seconds` after the last
          ejection ended forgets the earlier ejections (the backoff starts over)

At most `max_ejection_percent` of a role's workers are ejected at once, and never all of them:
with one worker left, routing to it and failing beats refusing every request. An ejected worker
comes back by itself when its window ends (the health filter compares `ejected_until` to now).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

# statuses that say the worker (not the request) is broken; connection errors arrive as UNAVAILABLE
WORKER_FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


@dataclass(frozen=True)
class OutlierDetectionConfig:
    consecutive_failures: int = 3  # 0 = off
    base_ejection_seconds: float = 5.0
    max_ejection_seconds: float = 60.0
    max_ejection_percent: int = 50

    def __post_init__(self):
        if self.consecutive_failures < 0:
            raise ValueError(f"outlier_consecutive_failures must be >= 0 (0 = off), got {self.consecutive_failures}")
        if not 0 < self.base_ejection_seconds <= self.max_ejection_seconds:
            raise ValueError(f"outlier ejection times need 0 < base ({self.base_ejection_seconds}) <= max ({self.max_ejection_seconds})")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"outlier_max_ejection_percent must be in [0, 100], got {self.max_ejection_percent}")


@dataclass
class _OutlierState:
    consecutive_failures: int = 0
    num_ejections: int = 0  # ejections that still lengthen the next window


class OutlierDetector:
    """Counts each worker's consecutive failures and ejects it (sets handle.ejected_until).
    Event-loop only. `on_eject(handle, seconds)` is told of each ejection (the metric)."""

    def __init__(self, config: OutlierDetectionConfig, on_eject: Callable | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._on_eject = on_eject
        self._clock = clock
        self._states: dict[str, _OutlierState] = {}  # by handle key

    @staticmethod
    def is_worker_failure(code: grpc.StatusCode) -> bool:
        return code in WORKER_FAILURE_CODES

    def record(self, handle, code: grpc.StatusCode, peers: Sequence) -> None:
        """One call's outcome on `handle`; `peers` are the workers of its role (for the cap). Mutates."""
        if self.is_worker_failure(code):
            self.record_failure(handle, peers)
        else:
            self.record_success(handle)

    def record_success(self, handle) -> None:
        state = self._states.get(handle.key)
        if state is None:
            return
        state.consecutive_failures = 0
        if state.num_ejections and self._clock() >= handle.ejected_until + self.config.max_ejection_seconds:
            state.num_ejections = 0
        if not state.num_ejections:
            del self._states[handle.key]  # nothing left to remember

    def record_failure(self, handle, peers: Sequence) -> bool:
        """Count a failure; True when it ejected the worker. Mutates the handle's ejected_until."""
        threshold = self.config.consecutive_failures
        if not threshold:
            return False
        state = self._states.setdefault(handle.key, _OutlierState())
        state.consecutive_failures += 1
        now = self._clock()
        if state.consecutive_failures < threshold or handle.ejected_until > now:
            return False
        if not self._may_eject(handle, peers, now):
            log.warning("%s %s failed %d times in a row but stays in routing (ejection cap reached)", handle.role, handle.worker_id, state.consecutive_failures)
            return False
        state.num_ejections += 1
        state.consecutive_failures = 0
        seconds = min(self.config.base_ejection_seconds * state.num_ejections, self.config.max_ejection_seconds)
        handle.ejected_until = now + seconds
        log.warning("ejecting %s %s from routing for %.1fs after %d consecutive failures (ejection %d)",
                    handle.role, handle.worker_id, seconds, threshold, state.num_ejections)  # fmt: skip
        if self._on_eject is not None:
            self._on_eject(handle, seconds)
        return True

    def _may_eject(self, handle, peers: Sequence, now: float) -> bool:
        """The cap: max_ejection_percent of the role (rounded down, but at least one, as Envoy;
        0% = never), and never every worker."""
        total = len({p.key for p in peers} | {handle.key})
        ejected = sum(1 for p in peers if p.key != handle.key and p.ejected_until > now)
        percent = self.config.max_ejection_percent
        allowed = min(total - 1, max(1, total * percent // 100)) if percent else 0
        return ejected + 1 <= allowed

    def forget(self, key: str) -> None:
        """The worker left the cluster. Mutates."""
        self._states.pop(key, None)

    def num_tracked(self) -> int:
        return len(self._states)
