"""What a result records about where and how it was made: the command, the machine, the code.

Numbers on a shared or small machine move with whatever else runs there, so a result carries the
client's own CPU time (see load_runner.py) and enough about the host to tell two results apart.
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

# flags whose value is a secret: a result (shared, committed, attached to issues) never holds it
SECRET_FLAGS = ("--api-key", "--api-keys")
REDACTED = "<redacted>"


def redact_secrets(argv: list[str]) -> list[str]:
    """argv with the values of SECRET_FLAGS (`--api-key KEY` and `--api-key=KEY`) replaced."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(arg)
    return out


def command_line(argv: list[str] | None) -> str:
    """The command as typed, secrets redacted: `tandem bench ...` from the bench arguments, else
    this process's argv."""
    if argv is not None:
        return shlex.join(["tandem", "bench", *redact_secrets(argv)])
    return shlex.join([Path(sys.argv[0]).name, *redact_secrets(sys.argv[1:])])


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    """The checkout's commit, when the code runs from one (best effort, 2 s at most)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tandem_commit": _git_commit(),
    }
