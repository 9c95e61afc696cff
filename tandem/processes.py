"""Child processes that never outlive their parent: the launcher's one way to start and stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Run in the child before the real program: ask the kernel to SIGTERM it when the launcher dies
# (even by SIGKILL), so `tandem up` never leaves orphans; PR_SET_PDEATHSIG survives exec. It is a
# tiny exec wrapper rather than a preexec_fn because preexec_fn forces fork(), and fork() in a
# process with live gRPC threads runs gRPC's fork handlers in the child, which abort it.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"  # the launcher died before prctl
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def popen_child(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr appended to log_path; it gets SIGTERM when we die."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def stop_child(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
