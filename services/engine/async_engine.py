"""AsyncEngine: the engine for servers. `add_request` returns an async iterator of outputs.

The EngineCore runs in one dedicated thread; torch releases the GIL inside its kernels, so the
event loop keeps answering (health checks, new requests, cancellations) during a long prefill.
Requests and aborts cross into the engine thread through a locked inbox; outputs come back to the
loop with `call_soon_threadsafe` into a per-request asyncio.Queue. A consumer that stops iterating
(client gone, deadline, task cancelled) aborts its request, so its KV blocks are freed.

When the engine thread dies (a bug, a kernel failure, an injected fault), every open stream and
pending integrity check gets EngineDeadError at once, later calls raise it, and the callbacks
registered with on_death() run on their loops: the worker uses that to leave routing and exit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from .block_pool import KVEvent
from .engine_commands import Abort, AddRequest, CheckIntegrity, EngineCommand, KVImported, ReleasePinned
from .engine_config import EngineConfig
from .engine_core import EngineCore, RequestOutput
from .fault_injection import EngineFault
from .kv_handoff import Handoff, KVImport
from .model_config import ModelConfig
from .sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine thread crashed; the request cannot complete."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's load after a step, as a worker reports it."""

    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_total_blocks: int
    num_pending_prefill_tokens: int = 0  # prompt tokens not computed yet, waiting or running

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks


# observer(stats, kv_events): called on the observer's event loop after every engine iteration
# that changed something; kv_events are the block pool's stored/removed/cleared events, in order
EngineObserver = Callable[[EngineStats, list[KVEvent]], None]


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        """Start the engine thread, which builds the EngineCore (loads the model) and then serves;
        returns once the model is loaded, or raises what loading raised. Blocks: call it from an
        executor thread in a server."""
        self.core: EngineCore | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[EngineCommand] = []  # applied in order on the engine thread (engine_commands.py)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._observer: tuple[asyncio.AbstractEventLoop, EngineObserver] | None = None
        self._death_callbacks: list[tuple[asyncio.AbstractEventLoop, Callable[[BaseException], None]]] = []
        self._fault = EngineFault.from_environ()  # a test hook; unarmed unless its variable is set
        # The model is loaded on the engine thread itself, not here: every torch op of this engine
        # then runs on one thread. libgomp keeps an OpenMP thread pool per thread that ever ran a
        # parallel region, and once its pools hold more threads than there are cores it stops
        # spinning between regions and parks its workers after each one (its "throttled" spin):
        # each of a step's ~1,000 small parallel ops then pays a futex wake-up. Measured here
        # (SmolLM2-135M, bf16, 2 threads, 64 running sequences): a decode step took 145-150 ms when
        # the model was loaded on another thread than the one stepping it, 95-100 ms when one
        # thread did both (see docs/benchmarks.md, "The served engine").
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._load_and_run, args=(config,), name="tandem-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    @property
    def tokenizer(self):
        return self.core.tokenizer

    # ---- what a worker reads about the loaded engine: named here, so that code outside the
    # engine never reaches through the core into its runner, KV manager or pool

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model_config(self) -> ModelConfig:
        return self.core.model_config

    @property
    def dtype_name(self) -> str:
        """The KV and compute dtype as a layout names it: "float32", "bfloat16"."""
        return str(self.core.dtype).removeprefix("torch.")

    @property
    def vocab_size(self) -> int:
        return self.core.model_config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.core.kv.pool.num_blocks

    @property
    def kv_storage(self) -> torch.Tensor:
        """The paged KV cache tensor [layers, 2, kv heads, blocks, block size, head dim] (for kvtransfer)."""
        return self.core.runner.kv_cache.storage

    @property
    def kv_bytes_per_block(self) -> int:
        return self.core.runner.kv_cache.layout.bytes_per_block

    # ---- the loop side --------------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None, handoff: Handoff | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its stream. Validation errors raise here, before anything is queued.

        `handoff` continues work done elsewhere (kv_handoff.Handoff). An import_kv request's stream
        starts with a KVImport: where to write the prompt's KV before calling complete_kv_import()."""
        self._raise_if_dead()
        self._validate(request_id, prompt_token_ids, params, cache_salt)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._raise_if_dead()  # checked under the lock: the thread's death handler takes it too
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(AddRequest(request_id, prompt_token_ids, params, cache_salt, handoff))
        self._wake.set()
        return self._stream(request_id, queue)

    def _raise_if_dead(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine thread died: {self.error!r}")

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` on the calling thread's event loop once the engine thread dies
        (soon, if it has already). Mutates."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.error is None:
                self._death_callbacks.append((loop, callback))
                return
            error = self.error
        loop.call_soon(callback, error)

    def _validate(self, request_id, prompt_token_ids, params, cache_salt=None) -> None:
        # the checks EngineCore.add_request runs in the engine thread, run here too so the caller
        # gets the ValueError synchronously instead of a broken stream
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
        self.core.validate(prompt_token_ids, params, cache_salt)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:  # (a KVImport is never finished)
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its final output (finish_reason 'abort') is dropped if nobody listens."""
        self._post(Abort(request_id))

    def complete_kv_import(self, request_id: str, ok: bool) -> None:
        """The KVImport's blocks are written (ok), or will not be (the engine recomputes the prompt)."""
        self._post(KVImported(request_id, ok))

    def release_pinned(self, request_id: str) -> None:
        """Free a prefill_only request's pinned KV blocks (after the pull, or when its lease ends)."""
        self._post(ReleasePinned(request_id))

    def _post(self, item: EngineCommand) -> None:
        with self._lock:
            self._inbox.append(item)
        self._wake.set()

    def set_observer(self, observer: EngineObserver | None) -> None:
        """Report stats and KV events to `observer` on the calling thread's event loop (None stops it)."""
        self._observer = None if observer is None else (asyncio.get_running_loop(), observer)

    def stats(self) -> EngineStats:
        core = self.core
        pool = core.kv.pool
        sched = core.scheduler
        waiting = len(sched.waiting) + len(core.importing)
        pending = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in (*sched.waiting, *sched.running))
        return EngineStats(len(sched.running), waiting, pool.num_used_blocks, pool.num_blocks, pending)

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    # ---- the engine thread ----------------------------------------------------------------------

    def _load_and_run(self, config: EngineConfig) -> None:
        try:
            self.core = EngineCore(config)
        except BaseException as e:  # noqa: BLE001 - re-raised by __init__ on the caller's thread
            self._load_error = e
            return
        finally:
            self._loaded.set()
        self._run()

    def _run(self) -> None:
        core = self.core
        try:
            while not self._stopping:
                if not core.has_work():
                    self._wake.wait(timeout=1.0)
                self._wake.clear()
                changed = self._drain_inbox()
                if core.has_work():
                    self._fault.before_step()
                    self._publish(core.step())
                    changed = True
                if changed:
                    self._notify_observer()
        except BaseException as e:  # noqa: BLE001 - every stream must learn the engine is gone
            self._die(e)
            raise  # the thread's excepthook logs the traceback
        finally:
            for rid in list(core.requests):
                core.abort(rid)

    def _die(self, error: BaseException) -> None:
        """On the dying engine thread: fail every stream and queued integrity check, then tell
        the on_death() callbacks. Under the lock, so no stream or check slips in after it."""
        with self._lock:
            self.error = error
            streams = list(self._streams.values())
            inbox, self._inbox = self._inbox, []
            callbacks, self._death_callbacks = self._death_callbacks, []
        dead = EngineDeadError(f"engine thread died: {error!r}")
        for loop, queue in streams:
            _call_soon(loop, queue.put_nowait, dead)
        for command in inbox:
            if isinstance(command, CheckIntegrity):
                _call_soon(command.loop, _settle, command.done, dead)
        for loop, callback in callbacks:
            _call_soon(loop, callback, error)

    def _notify_observer(self) -> None:
        events = self.core.kv.take_events()
        observer = self._observer
        if observer is not None:
            loop, fn = observer
            try:
                loop.call_soon_threadsafe(fn, self.stats(), events)
            except RuntimeError:  # the observer's loop is closed
                self._observer = None

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; True when there were any."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        core = self.core
        for command in inbox:
            match command:
                case AddRequest(request_id, prompt, params, salt, handoff):
                    try:
                        core.add_request(request_id, prompt, params, salt, handoff=handoff)
                    except ValueError as e:
                        self._deliver(request_id, e)
                        continue
                    if handoff is not None and handoff.import_kv:
                        # the stream's first item says where the KV goes (or that there was no room
                        # for it and the prompt is computed here instead)
                        target = core.kv_import(request_id) or KVImport(request_id, (), 0, core.config.block_size, recompute=True)
                        self._deliver(request_id, target)
                case Abort(request_id):
                    core.abort(request_id)
                case KVImported(request_id, ok):
                    core.complete_kv_import(request_id, ok)
                case ReleasePinned(request_id):
                    core.release_pinned(request_id)
                case CheckIntegrity(loop, done):
                    try:
                        core.check_integrity()
                        _call_soon(loop, _settle, done, None)
                    except AssertionError as e:
                        _call_soon(loop, _settle, done, e)
        return bool(inbox)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each listening loop in one call: call_soon_threadsafe wakes
        the loop through its self-pipe (a write syscall each), and this runs on the engine thread,
        between steps, so one wake-up per loop instead of one per running request (64 a step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, deliveries in by_loop.items():
            _call_soon(loop, _put_all, deliveries)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def check_integrity(self) -> None:
        """Check the engine's invariants from this thread: only while the engine thread is idle or gone."""
        self.core.check_integrity()

    async def check_integrity_live(self) -> None:
        """Check the invariants on the engine thread, between steps, while it serves; raises
        AssertionError (with what is wrong) here."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._lock:
            self._raise_if_dead()  # a dead thread would never answer: fail now (the death handler fails queued ones)
            self._inbox.append(CheckIntegrity(loop, done))
        self._wake.set()
        await done


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def _put_all(deliveries: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)


def _settle(future: asyncio.Future, outcome: BaseException | None) -> None:
    """Resolve `future` with `outcome` (an exception, or None for success) unless its waiter gave up."""
    if future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
