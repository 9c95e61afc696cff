"""The UCX runtime must not wake its process when nothing moves: ucxx's progress thread defaults to
a 1 ms epoll timeout, ~900 wake-ups a second for the life of a decode worker, each one preempting
the engine's OpenMP threads on a small machine (kvtransfer/ucx_runtime.py). Counted in a fresh
process (this one's other threads would blur the count), from the kernel's context-switch counters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

COUNT_IDLE_WAKEUPS = textwrap.dedent(
    """
    import os, time
    from kvtransfer.ucx_runtime import UcxRuntime

    def switches():
        total = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                total += sum(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt_switches"))
        return total

    UcxRuntime.get()
    time.sleep(0.5)  # past start-up
    before = switches()
    time.sleep(2.0)
    print((switches() - before) / 2.0)
    """
)


def test_an_idle_ucx_runtime_sleeps():
    out = subprocess.run([sys.executable, "-c", COUNT_IDLE_WAKEUPS], capture_output=True, text=True, timeout=120, check=True)
    per_second = float(out.stdout.strip().splitlines()[-1])
    # ~900/s with ucxx's 1 ms epoll timeout; ~50/s with ours (20 ms) plus the loop's own timers
    assert per_second < 300, f"the idle UCX runtime woke {per_second:.0f} times a second"
