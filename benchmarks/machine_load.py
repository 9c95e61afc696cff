"""The machine's CPU time, for benchmarks that compare servers made of several processes."""

from __future__ import annotations

import os


def machine_busy_seconds() -> float:
    """CPU time of every process on the machine since boot (/proc/stat, all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:8]
    return (sum(int(x) for x in fields) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")


def busy_cores() -> float:
    """How many cores are busy right now, averaged over half a second (a quiet machine reads ~0)."""
    import time

    a, t = machine_busy_seconds(), time.perf_counter()
    time.sleep(0.5)
    return (machine_busy_seconds() - a) / (time.perf_counter() - t)
