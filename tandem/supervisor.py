"""Supervisor: bring back the cluster's processes that exit, with backoff and a crash-loop limit.

    child exits ──► "exited" ──(backoff: 1 s, 2 s, 4 s ... capped)──► restart ──► "restarted"
                                                                        │ answers health
                                                                        ▼
                                                                     "serving"
    exits again before it stayed up `stable_after` s: the streak grows (and so does the backoff);
    stayed up that long: the streak starts over. Streak past `max_restarts`: "gave_up" on that
    child, the rest keeps running — unless the child is critical (etcd), then "fatal".

Like Docker's `unless-stopped` and Kubernetes' `restartPolicy: Always`, any exit is restarted,
whatever its code: only the launcher's own stop ends a service for good. The decisions are made in
`tick()`, one pass over the children against an injectable clock, so tests drive it step by step;
`start()` runs ticks on a thread, and `stop()` ends that thread before the caller stops the
children, so nothing is restarted while the cluster shuts down.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff: float = 1.0  # seconds before the first restart of a streak
    max_backoff: float = 30.0  # the doubling stops here
    stable_after: float = 60.0  # up this long: its next exit starts a new streak (and backoff)
    max_restarts: int = 5  # restarts in one streak; the exit after the last one gives up
    etcd_max_restarts: int = 3  # the same for etcd, whose loss stops the whole cluster

    def __post_init__(self) -> None:
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError(f"restart backoff must satisfy 0 <= initial ({self.initial_backoff}) <= max ({self.max_backoff})")
        if self.max_restarts < 0 or self.etcd_max_restarts < 0:
            raise ValueError("max restarts must be >= 0 (0 = never restart)")

    def backoff(self, streak: int) -> float:
        """The delay before restart number `streak` (1-based) of a streak."""
        return min(self.initial_backoff * 2 ** (streak - 1), self.max_backoff)


class Child(Protocol):
    """What the supervisor watches: a service process or etcd."""

    name: str

    def exit_code(self) -> int | None:
        """None while it runs."""

    def restart(self) -> None:
        """Start it again, with the same identity, ports and data (non-blocking)."""

    def is_serving(self) -> bool:
        """True once it answers its health check."""


@dataclass(frozen=True)
class SupervisorEvent:
    kind: str  # exited | restarted | serving | gave_up | fatal
    name: str
    restarts: int  # restarts of this child so far (the restart count shown to the user)
    message: str


@dataclass
class ChildState:
    child: Child
    max_restarts: int
    critical: bool
    started_at: float
    restarts: int = 0
    streak: int = 0
    restart_at: float | None = None  # set while it is down and waiting out its backoff
    exited_at: float | None = None
    starting: bool = False  # restarted, not yet answering its health check
    gave_up: bool = False


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, policy: RestartPolicy, on_event: Callable[[SupervisorEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.2):  # fmt: skip
        self.policy = policy
        self.on_event = on_event
        self.clock = clock
        self.interval = interval
        self.failed: str | None = None  # why a critical child could not be kept up
        self._children: dict[str, ChildState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick at a time; stop() waits for the one in progress

    def add(self, child: Child, critical: bool = False) -> None:
        """Watch `child` (already running). Critical: when it cannot be kept up, the supervisor fails."""
        limit = self.policy.etcd_max_restarts if critical else self.policy.max_restarts
        self._children[child.name] = ChildState(child, limit, critical, started_at=self.clock())

    def restarts(self, name: str) -> int:
        return self._children[name].restarts

    def gave_up(self, name: str) -> bool:
        return self._children[name].gave_up

    def status(self) -> dict[str, dict]:
        """name → restarts, state (running | starting | waiting | gave_up) — for output and tests."""
        out = {}
        for name, s in self._children.items():
            state = "gave_up" if s.gave_up else "waiting" if s.restart_at is not None else "starting" if s.starting else "running"
            out[name] = {"restarts": s.restarts, "state": state}
        return out

    # ---- the decisions -----------------------------------------------------------------------

    def tick(self) -> list[SupervisorEvent]:
        """One pass: notice exits, restart what is due, notice restarted children serving. Mutates."""
        with self._lock:
            events: list[SupervisorEvent] = []
            for s in self._children.values():
                if self.failed is not None or self._stop.is_set():
                    break
                if not s.gave_up:
                    self._tick_child(s, self.clock(), events)
            for event in events:
                if self.on_event is not None:
                    self.on_event(event)
            return events

    def _tick_child(self, s: ChildState, now: float, events: list[SupervisorEvent]) -> None:
        name = s.child.name
        if s.restart_at is None:
            code = s.child.exit_code()
            if code is None:
                if s.starting and s.child.is_serving():
                    s.starting = False
                    down = f", {now - s.exited_at:.1f}s after it exited" if s.exited_at is not None else ""
                    events.append(SupervisorEvent("serving", name, s.restarts, f"{name} is SERVING again (restart {s.restarts}{down})"))
                return
            self._exited(s, now, describe_exit(code), events)
            return
        if now >= s.restart_at:
            s.restart_at = None
            try:
                s.child.restart()
            except Exception as e:  # noqa: BLE001 - a start that fails counts as an exit
                s.restarts += 1
                s.started_at = now
                self._exited(s, now, f"could not be started ({e})", events)
                return
            s.restarts += 1
            s.started_at, s.starting = now, True
            events.append(SupervisorEvent("restarted", name, s.restarts, f"{name} restarted (restart {s.restarts})"))

    def _exited(self, s: ChildState, now: float, how: str, events: list[SupervisorEvent]) -> None:
        name = s.child.name
        s.starting = False
        s.exited_at = now
        if now - s.started_at >= self.policy.stable_after:
            s.streak = 0  # it had been up long enough: this is a new failure, not a crash loop
        s.streak += 1
        if s.streak > s.max_restarts:
            s.gave_up = True
            tries = f"after {s.restarts} restarts" if s.restarts else "with restarts off"
            if s.critical:
                self.failed = f"{name} {how} and could not be kept up ({tries})"
                events.append(SupervisorEvent("fatal", name, s.restarts, self.failed))
            else:
                events.append(SupervisorEvent("gave_up", name, s.restarts, f"{name} {how}; giving up on it {tries}, the rest keeps running"))
            return
        delay = self.policy.backoff(s.streak)
        s.restart_at = now + delay
        events.append(SupervisorEvent("exited", name, s.restarts, f"{name} {how}; restart {s.restarts + 1} in {delay:.1f}s"))

    # ---- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def halt(self) -> None:
        """Restart nothing from now on; safe in a signal handler (it does not wait)."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Halt and wait for the thread, so no restart races the caller's shutdown. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
