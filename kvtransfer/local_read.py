"""Same-host pulls: the client reads the server's blocks itself, with one process_vm_readv call per
1,024 runs of blocks, instead of one UCX rendezvous message per run.

Why: a cycled pool's blocks are scattered, so a pull is one 720 KiB message per block, and each
message costs UCX's rendezvous handshake plus ucxx's request and future on both sides, ~0.07 ms
beyond the copy itself. On the 12-07 Zen 4 a 64-block pull took 13.4 ms over UCX against 5.7 ms
for the same scattered blocks in one process_vm_readv call, which is what UCX's CMA lane runs for
each message anyway (docs/benchmarks.md, 12-08).

When: only where UCX's CMA lane could do the same read. The server advertises its host identity
(boot id and pid namespace, what UCX's CMA lane checks too) in its address when UCX may use CMA
(UCX_TLS unset, or naming cma, sm or all); a client with the same identity asks for a local read.
Containers that share a pid namespace (the compose file's prefill and decode) are one host here;
pods are not. The kernel still decides: process_vm_readv needs the right to ptrace the server
(same user, and Yama's ptrace_scope 0, or CAP_SYS_PTRACE). A read it refuses raises
LocalReadError, and the pull goes on as UCX messages (one requested over the same-host channel,
local_channel.py, fails instead: the first read from that server was allowed), as do later pulls
from that server. Where the operator names UCX's transports
without CMA (UCX_TLS=tcp,self in Kubernetes and in the multi-host tests' network namespaces),
servers offer no local reads.

Nothing here widens what a peer may read: a process allowed to call process_vm_readv on the
server can read all its memory with or without Tandem; the server still names only the blocks of
a checked token, and the client counts the read only on the server's final OK (ucx_protocol.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import struct
import uuid
from collections.abc import Sequence

import numpy as np

IOV_MAX = 1024  # the most iovecs one process_vm_readv call takes (Linux UIO_MAXIOV)
HOST_ID_BYTES = 24  # boot id (16) + pid namespace inode (8)
_CMA_LANES = ("all", "cma", "sm")  # UCX_TLS names under which UCX itself would read with CMA


Runs = np.ndarray | Sequence[tuple[int, int]]  # (address, length) pairs


class LocalReadError(OSError):
    """process_vm_readv refused or fell short (no ptrace right, the server gone, a bad address)."""


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@functools.cache
def _process_vm_readv():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.process_vm_readv  # a CDLL call releases the GIL for the copy
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return fn


@functools.cache
def host_identity() -> bytes:
    """This process's host as local reads see it (HOST_ID_BYTES), or b"" where /proc cannot say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = uuid.UUID(f.read().strip()).bytes
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except (OSError, ValueError):
        return b""
    return boot + struct.pack("<Q", pid_ns)


def offered(environ: dict[str, str] | None = None) -> bool:
    """Whether a server offers local reads: UCX_TLS, where set, must let UCX use CMA itself."""
    tls = (os.environ if environ is None else environ).get("UCX_TLS")
    if tls is None:
        return True
    lanes = {t.strip() for t in tls.removeprefix("^").split(",")}
    if tls.startswith("^"):  # UCX's syntax for "every lane but these"
        return not lanes & set(_CMA_LANES)
    return bool(lanes & set(_CMA_LANES))


def read_runs(pid: int, remote: Runs, local: Runs) -> None:
    """Copy each remote (address, length) run of process `pid` into the local run at the same index
    (equal lengths). Runs are [n, 2] arrays (or pairs): built with numpy, not one ctypes struct at a
    time (0.5 ms of GIL-held Python for 1,024 runs). Blocks the calling thread for the copy (a worker
    thread: it holds no GIL)."""
    rem, loc = _as_iovecs(remote), _as_iovecs(local)
    if rem.shape != loc.shape or (rem[:, 1] != loc[:, 1]).any():
        raise ValueError("remote and local runs differ")
    readv, iov = _process_vm_readv(), ctypes.POINTER(_IOVec)
    for lo in range(0, len(rem), IOV_MAX):
        there, here = rem[lo : lo + IOV_MAX], loc[lo : lo + IOV_MAX]
        want = int(there[:, 1].sum())
        got = readv(pid, here.ctypes.data_as(iov), len(here), there.ctypes.data_as(iov), len(there), 0)
        if got != want:
            err = ctypes.get_errno() if got < 0 else 0
            why = os.strerror(err) if got < 0 else f"{got} of {want} bytes (a remote range is not mapped)"
            raise LocalReadError(err, f"process_vm_readv from pid {pid}: {why}")


def _as_iovecs(runs: Runs) -> np.ndarray:
    """(address, length) runs as a C-contiguous uint64 [n, 2] array: the layout of struct iovec."""
    return np.ascontiguousarray(np.asarray(runs, dtype=np.uint64).reshape(-1, 2))


def read_runs_and_check(pid: int, remote: Runs, local: Runs, check_address: int) -> int:
    """read_runs, then the server's int64 check word at `check_address`, read after the data: its
    value says whether the blocks were still held once the data had been read (ucx_protocol.py)."""
    read_runs(pid, remote, local)
    word = ctypes.c_int64(0)
    read_runs(pid, [(check_address, 8)], [(ctypes.addressof(word), 8)])
    return word.value
