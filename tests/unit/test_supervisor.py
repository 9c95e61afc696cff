"""The Supervisor's decisions, tick by tick on a fake clock with fake children: backoff, the streak
reset after a stable run, the crash-loop limit, a critical child, and stop()."""

from __future__ import annotations

import pytest

from tandem.supervisor import RestartPolicy, Supervisor, describe_exit

POLICY = RestartPolicy(initial_backoff=1.0, max_backoff=4.0, stable_after=10.0, max_restarts=3, etcd_max_restarts=1)


class FakeChild:
    def __init__(self, name: str):
        self.name = name
        self.code: int | None = None
        self.serving = True
        self.starts = 0
        self.fail_start = False

    def exit_code(self):
        return self.code

    def restart(self):
        if self.fail_start:
            raise OSError("no such file")
        self.starts += 1
        self.code = None

    def is_serving(self):
        return self.serving


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def supervisor(clock, *children, critical=()):
    events = []
    sup = Supervisor(POLICY, on_event=events.append, clock=clock)
    for child in children:
        sup.add(child, critical=child.name in critical)
    return sup, events


def kinds(events):
    return [(e.kind, e.name, e.restarts) for e in events]


def test_backoff_doubles_up_to_its_cap():
    assert [POLICY.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("kw", [{"initial_backoff": -1}, {"initial_backoff": 5, "max_backoff": 1}, {"max_restarts": -1}])
def test_a_policy_that_makes_no_sense_is_refused(kw):
    with pytest.raises(ValueError):
        RestartPolicy(**kw)


def test_an_exited_child_is_restarted_after_its_backoff_and_reported_serving(clock):
    child = FakeChild("decode-1")
    sup, events = supervisor(clock, child)
    assert sup.tick() == []
    child.code, child.serving = -9, False
    assert kinds(sup.tick()) == [("exited", "decode-1", 0)]
    assert "killed by SIGKILL" in events[0].message and "restart 1 in 1.0s" in events[0].message
    clock.now += 0.9
    assert sup.tick() == [] and child.starts == 0, "restarted before its backoff"
    clock.now += 0.1
    assert kinds(sup.tick()) == [("restarted", "decode-1", 1)]
    assert child.starts == 1 and sup.restarts("decode-1") == 1 and sup.status()["decode-1"] == {"restarts": 1, "state": "starting"}
    assert sup.tick() == []  # not serving yet
    child.serving = True
    [serving] = sup.tick()
    assert serving.kind == "serving" and "restart 1" in serving.message and "1.0s after it exited" in serving.message
    assert sup.status()["decode-1"]["state"] == "running"


def crash(sup, clock, child):
    """Let the child exit at once, then wait out its (longest) backoff: it is restarted."""
    child.code = 1
    sup.tick()
    clock.now += POLICY.max_backoff
    sup.tick()


def test_a_crash_loop_backs_off_then_gives_up_and_leaves_the_others_alone(clock):
    looping, other = FakeChild("tokenizer"), FakeChild("gateway")
    sup, _ = supervisor(clock, looping, other)
    delays = []
    for _ in range(POLICY.max_restarts):
        looping.code = 1
        [exited] = sup.tick()
        delays.append(sup._children["tokenizer"].restart_at - clock.now)
        clock.now += delays[-1]
        assert [e.kind for e in sup.tick()] == ["restarted"]
    assert delays == [1.0, 2.0, 4.0]
    looping.code = 1
    [gave_up] = sup.tick()
    assert gave_up.kind == "gave_up" and "after 3 restarts" in gave_up.message and "the rest keeps running" in gave_up.message
    assert sup.gave_up("tokenizer") and sup.failed is None
    clock.now += 100
    assert sup.tick() == [] and looping.starts == 3, "nothing is restarted after giving up"
    other.code = -9
    assert [e.kind for e in sup.tick()] == ["exited"], "the other children are still supervised"


def test_a_run_longer_than_stable_after_starts_a_new_streak(clock):
    child = FakeChild("decode-0")
    sup, _ = supervisor(clock, child)
    for _ in range(POLICY.max_restarts):
        crash(sup, clock, child)
    assert sup.restarts("decode-0") == 3
    clock.now += POLICY.stable_after  # this run lasted long enough: the next exit is a new failure
    child.code = 1
    [exited] = sup.tick()
    assert exited.kind == "exited" and "restart 4 in 1.0s" in exited.message


def test_a_child_that_cannot_even_be_started_counts_as_exiting(clock):
    child = FakeChild("prefill-0")
    sup, _ = supervisor(clock, child)
    child.code = 1
    sup.tick()
    child.fail_start = True
    clock.now += 1
    [again] = sup.tick()
    assert again.kind == "exited" and "could not be started (no such file)" in again.message and "in 2.0s" in again.message


def test_a_critical_child_that_cannot_be_kept_up_fails_the_supervisor(clock):
    etcd, worker = FakeChild("etcd"), FakeChild("decode-0")
    sup, events = supervisor(clock, etcd, worker, critical={"etcd"})
    crash(sup, clock, etcd)  # its one restart
    etcd.code = 1
    worker.code = 1
    assert kinds(sup.tick()) == [("fatal", "etcd", 1)]
    assert sup.failed and "etcd exit code 1 and could not be kept up (after 1 restarts)" in sup.failed
    clock.now += 100
    assert sup.tick() == [] and worker.starts == 0, "a failed cluster restarts nothing more"


def test_max_restarts_zero_never_restarts(clock):
    child = FakeChild("decode-0")
    sup = Supervisor(RestartPolicy(max_restarts=0), clock=clock)
    sup.add(child)
    child.code = 0
    [gave_up] = sup.tick()
    assert gave_up.kind == "gave_up" and "with restarts off" in gave_up.message


def test_after_stop_nothing_is_restarted(clock):
    child = FakeChild("gateway")
    sup, _ = supervisor(clock, child)
    sup.start()
    sup.stop()
    child.code = -15
    clock.now += 100
    assert sup.tick() == [] and child.starts == 0
    sup.stop()  # idempotent


def test_the_thread_restarts_a_child_on_its_own():
    child = FakeChild("decode-0")
    sup = Supervisor(RestartPolicy(initial_backoff=0.0), interval=0.01)
    sup.add(child)
    sup.start()
    try:
        child.code = -9
        from tests.helpers.waiting import wait_for

        wait_for(lambda: child.starts == 1 and sup.status()["decode-0"]["state"] == "running", "the restart", timeout=5)
    finally:
        sup.stop()


@pytest.mark.parametrize(
    "code, text", [(-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"), (0, "exit code 0"), (3, "exit code 3"), (-99, "killed by signal 99")]
)
def test_describe_exit(code, text):
    assert describe_exit(code) == text
