"""The process's UCX runtime: one ucxx context on a private event loop thread, configured for CPU KV.

Every UCX operation of the KV transport runs on this private loop; the transport's public coroutines
run on the caller's loop (uvloop in the services, a fresh loop per test) and hop here (run(),
spawn()). Why a private loop: ucxx's asyncio layer binds its context to the event loop that is
current when the context is created (its notifier thread resolves request futures on that loop),
so a context shared with the caller's loop would break as soon as that loop is replaced; and
without the notifier (`enable_python_future=False`) every pending UCX request busy-polls its loop
with `asyncio.sleep(0)`, burning a core for as long as a server waits for requests.

UCX configuration, passed to the context (ucp_config_modify), so it holds whatever `import ucxx`
put in the environment. Measured with UCX 1.21 (libucx-cu12 wheel), two processes, one host:

  forced (the data path depends on them):
    MM_ERROR_HANDLING=y      posix/sysv shared memory advertise peer-failure support, so they can
                             carry error-handling endpoints; without it there is no shm lane: the
                             endpoint never connects (TLS without tcp) or runs on TCP (~1 GB/s)
    CMA_MEMORY_INVALIDATE=y  lets UCX pick the rendezvous zero-copy protocol (the receiver copies
                             once, with process_vm_readv) on error-handling endpoints: 13-16 GB/s
                             for 64-256 MiB messages. Without it large messages go "fragmented
                             copy-in copy-out" through the shm FIFO: a copy in each process and
                             0.2-18 GB/s depending on how promptly both sides progress. UCX calls
                             this capability "not really supported yet": a failed request's buffer
                             may still be read by the peer. Segments are sent straight from the
                             KV cache, so a client counts a pull only on the server's final OK,
                             sent after every send completed with the blocks still held
                             (ucx_protocol.py); a client whose pull failed waits until UCX has
                             finished every receive into its cache before it reports.
    RNDV_FRAG_MEM_TYPE=host  `import ucxx` sets it to cuda for GPU pipelines
  defaults (an UCX_<NAME> environment variable overrides them):
    TLS=posix,cma,tcp,self   shm + CMA on one host, TCP across hosts (this UCX wheel has no verbs)
    KEEPALIVE_INTERVAL=1s    how soon a silently dead peer is noticed (UCX default 20 s): a sender
                             whose receiver was killed gets an error after 0.4-0.9 s (19.8 s with
                             the default); a receiver whose sender was killed, at once

Endpoint error handling is always on: with it off, a peer killed mid-transfer over TCP crashed the
survivor (SIGSEGV) in 10 of 14 trials, and over shm a sender whose receiver died waits forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# `import ucxx` sets UCX_MEMTYPE_CACHE, which UCX 1.21 no longer knows; UCX would print a warning
# about it on stdout when the context is created. Read when libucs loads, so set before ucxx is
# imported (this module imports ucxx lazily).
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

FORCED_OPTIONS = {
    "MM_ERROR_HANDLING": "y",
    "CMA_MEMORY_INVALIDATE": "y",
    "RNDV_FRAG_MEM_TYPE": "host",
}
DEFAULT_OPTIONS = {
    "TLS": "posix,cma,tcp,self",
    "KEEPALIVE_INTERVAL": "1s",
}


# The data plane's host (the service's --host): UCX's TCP transport listens on every network
# interface it finds unless NET_DEVICES restricts it, so a service bound to loopback would still
# expose its KV cache on eth0. Set by the worker before its transport starts.
_data_plane_host: str | None = None
_ANY_HOSTS = ("", "0.0.0.0", "::", "[::]")


def set_data_plane_host(host: str) -> None:
    """Confine UCX's network transports to the interface that holds `host` (loopback: `lo`);
    0.0.0.0 leaves every interface, as the service itself listens on all. Call before the first
    transport starts; UCX_NET_DEVICES in the environment still wins."""
    global _data_plane_host
    _data_plane_host = host


def _interface_of(host: str) -> str | None:
    import ipaddress
    import socket

    if host in _ANY_HOSTS:
        return None
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host.strip("[]")))
    except (OSError, ValueError):
        return None
    if ip.is_loopback:
        return "lo"
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                raw = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == str(ip):
                return name
    return None


def ucx_options(environ: dict[str, str] | None = None, data_plane_host: str | None = None) -> dict[str, str]:
    """The options given to the UCX context: the forced ones, plus defaults the environment lacks."""
    env = os.environ if environ is None else environ
    opts = {k: v for k, v in DEFAULT_OPTIONS.items() if f"UCX_{k}" not in env}
    host = _data_plane_host if data_plane_host is None else data_plane_host
    device = _interface_of(host) if host is not None and "UCX_NET_DEVICES" not in env else None
    if device is not None:
        opts["NET_DEVICES"] = device
    opts.update(FORCED_OPTIONS)
    return opts


PROGRESS_EPOLL_TIMEOUT_MS = 20  # the UCX progress thread's longest sleep without an event (see _init)


class UcxRuntime:
    """A daemon thread running an asyncio loop that owns a ucxx ApplicationContext."""

    _instance: UcxRuntime | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ctx: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kv-ucx-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("UCX runtime did not start within 60 s")
        if self._error is not None:
            raise RuntimeError(f"UCX runtime failed to start: {self._error}") from self._error

    @classmethod
    def get(cls) -> UcxRuntime:
        with cls._lock:
            if cls._instance is None:
                cls._instance = UcxRuntime()
            return cls._instance

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._init())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _init(self) -> None:
        # ucxx's import sets UCX_* defaults meant for GPUs; ours are passed explicitly below and win
        from ucxx._lib_async import ApplicationContext

        opts = ucx_options()
        self.ctx = ApplicationContext(opts, progress_mode="thread", enable_python_future=True)
        # ucxx starts its progress thread with a 1 ms epoll timeout: ~900 wake-ups a second for
        # the life of the process, transfers or not. In a worker those wake-ups preempt the
        # engine's OpenMP threads (each stalls a 2-thread parallel region on a 2-core machine):
        # served throughput was 2-6% lower with them (docs/benchmarks.md). UCX signals its
        # events on the epoll fd; the timeout only bounds a missed one, so a longer one costs
        # transfers nothing measurable (benchmarks.kv_transfer, same run: 1.5-2.5 GB/s either way).
        self.ctx.worker.stop_progress_thread()
        self.ctx.worker.start_progress_thread(polling_mode=False, epoll_timeout=PROGRESS_EPOLL_TIMEOUT_MS)
        log.info("UCX context ready (options %s)", opts)

    def address(self) -> bytes:
        return bytes(self.ctx.worker_address)

    async def run(self, coro_fn: Callable[[], Awaitable[T]]) -> T:
        """Await coro_fn() on the UCX loop from any other loop; cancelling the caller cancels it there."""
        fut = asyncio.run_coroutine_threadsafe(coro_fn(), self.loop)
        return await asyncio.wrap_future(fut)

    def spawn(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        """Start a coroutine on the UCX loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, coro: Coroutine[Any, Any, T]) -> LoopTask[T]:
        """Start a coroutine on the UCX loop; its LoopTask's `ended` completes only once it has ended."""
        return LoopTask(self.loop, coro)


class LoopTask(Generic[T]):
    """A coroutine running on another thread's loop, whose `ended` future completes (with its result,
    its exception, or cancelled) only once the coroutine has ended, its `finally` blocks included.

    run_coroutine_threadsafe's future is marked cancelled the moment it is cancelled, while the
    task's cancellation has not even reached the other loop; a caller that waited on it went on
    before the coroutine's cleanup had run (a KV pull's receives or read into the cache)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]):
        self.ended: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._loop = loop
        self._task: asyncio.Task | None = None
        loop.call_soon_threadsafe(self._start, coro)  # callbacks run in order: before any cancel()

    def cancel(self) -> None:
        """Ask the coroutine to stop (CancelledError inside it); wait on `ended` for it to have."""
        self._loop.call_soon_threadsafe(self._cancel)

    def _start(self, coro: Coroutine[Any, Any, T]) -> None:
        self._task = self._loop.create_task(coro)
        self._task.add_done_callback(self._finished)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _finished(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self.ended.cancel()
        elif (error := task.exception()) is not None:
            self.ended.set_exception(error)
        else:
            self.ended.set_result(task.result())


def ucx_address(buf: bytes) -> Any:
    """A peer's worker address (bytes) as ucxx wants it."""
    import ucxx._lib.libucxx as ucx_api

    return ucx_api.UCXAddress.create_from_buffer(buf)
