"""SimEngine: a simulated worker's engine — the real scheduler's decisions, a TimingModel's clock.

    add_request ──► SimScheduler (waiting → running) ──schedule──► step ──► outputs (per-request queues)
                         │                                         └── await asyncio.sleep(step time)
                         └── SimKVCache: prefix hits, allocate_slots, publish full blocks

Steps are the real engine's (loadtest/sim/scheduler.py mirrors services/engine/scheduler.py):
continuous batching under a token budget, chunked prefill, decodes and prefill chunks in one step,
**preemption by recompute** when blocks run out. A step *sleeps* for what the TimingModel says
its tokens cost (measured from the schedule, so Python overhead is part of it), then applies the
result: computed blocks are published (`stored` events), and requests whose computed tokens
reached their length get one output token.

Outputs are pseudo-random token ids, deterministic per request id (a disaggregated request's
decode worker continues the sequence its prefill worker began). The engine honours max_tokens,
the context length and stop_token_ids, never samples EOS (every request runs to max_tokens, as
with ignore_eos) and ignores stop strings and logprobs: there is no text.

Disaggregation as services/engine/kv_handoff.py: `prefill_only` finishes after the first token and
pins the prompt's blocks (`pinned`) until `release_pinned`; `import_kv` allocates the prompt's
blocks after this engine's cached prefix and parks the request until `complete_kv_import`.

Everything runs on one asyncio loop; an idle engine awaits an Event (no polling), so a thousand idle
engines cost nothing. After every step or outside change, the observer gets (SimStats, KV events).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from .kv_cache import KVEvent, SimKVCache
from .request import FINISHED, FIRST_TOKEN_ID, IMPORTING, RUNNING, WAITING, PinnedBlocks, SimImport, SimOutput, SimRequest, SimStats
from .scheduler import SimScheduler
from .timing import TimingModel

__all__ = ["PinnedBlocks", "SimEngine", "SimEngineClosed", "SimImport", "SimOutput", "SimRequest", "SimStats", "SimStream"]


class SimEngineClosed(RuntimeError):
    """The engine was closed while the request ran."""


class SimStream:
    """A request's outputs, in order, until the finished one. Leaving early (aclose(), or the
    consuming task cancelled while it waits) aborts the request and frees its blocks, and a
    prefill's pinned blocks are released when its final output was never read."""

    def __init__(self, engine: SimEngine, req: SimRequest):
        self._engine, self._req = engine, req
        self._done = False

    def __aiter__(self) -> SimStream:
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._req.queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    async def aclose(self) -> None:
        """Stop consuming. Idempotent; a no-op after the finished output was read."""
        if not self._done:
            self._done = True
            self._engine._abandon(self._req)


Observer = Callable[[SimStats, list[KVEvent]], None]


class SimEngine:
    def __init__(self, cache: SimKVCache, timing: TimingModel, max_model_len: int, vocab_size: int = 49152):
        if vocab_size <= FIRST_TOKEN_ID:
            raise ValueError(f"vocab_size must be > {FIRST_TOKEN_ID}, got {vocab_size}")
        self.cache, self.timing = cache, timing
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.requests: dict[str, SimRequest] = {}
        self.scheduler = SimScheduler(cache, timing)
        self.importing: dict[str, SimRequest] = {}
        self.pinned: dict[str, PinnedBlocks] = {}
        self.num_steps = 0
        self.busy_seconds = 0.0  # Σ simulated step times: the compute this worker would have spent
        self._observer: Observer | None = None
        self._wake = asyncio.Event()
        self._dirty = False
        self._task: asyncio.Task | None = None

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self):
        return self.scheduler.running

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ---- lifecycle ------------------------------------------------------------------------------

    def set_observer(self, observer: Observer | None) -> None:
        self._observer = observer

    def start(self) -> None:
        """Start the step loop on the running event loop."""
        self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def close(self) -> None:
        """Stop the loop; every live stream ends with SimEngineClosed and every block is freed. Mutates."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for req in list(self.requests.values()):
            req.queue.put_nowait(SimEngineClosed(f"the engine closed while {req.request_id} ran"))
            self._remove(req)
        for rid in list(self.pinned):
            self.release_pinned(rid)
        self._observer = None

    # ---- requests (called from RPC handlers) ----------------------------------------------------

    def validate(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """Raise ValueError (naming the field) for a request that can never run here; as the real
        engine's EngineCore.validate. Does not mutate."""
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty (got 0 tokens)")
        vocab = self.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            i, t = next((i, t) for i, t in enumerate(prompt_token_ids) if not 0 <= t < vocab)
            raise ValueError(f"prompt_token_ids[{i}] = {t!r} is outside the vocabulary [0, {vocab})")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt is {n} tokens but the model's context (max_model_len) is {self.max_model_len}; "
                f"it must be at most {self.max_model_len - 1} tokens to leave room for one output token"
            )
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        worst_case = min(n + max_tokens, self.max_model_len)
        blocks = -(-worst_case // self.cache.block_size)
        if blocks > self.cache.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({worst_case} tokens) needs {blocks} KV blocks but the cache has "
                f"{self.cache.num_blocks}; lower max_tokens or give the KV cache more memory"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        cache_salt: str | None = None,
        stop_token_ids=(),
        *,
        prefill_only: bool = False,
        output_token_ids: list[int] = (),
        import_kv: bool = False,
    ) -> SimStream:
        """Queue a request; returns its output stream (SimOutputs; an import_kv request's first item
        is a SimImport). Raises ValueError (naming the field), queueing nothing, on bad input.
        Leaving the stream early aborts the request and frees its blocks. Mutates."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate(prompt_token_ids, max_tokens)
        if import_kv and not output_token_ids:
            raise ValueError("import_kv needs the first token the prefill worker sampled (output_token_ids)")
        req = SimRequest(request_id, list(prompt_token_ids), max_tokens, cache_salt or None, frozenset(stop_token_ids), prefill_only,
                         asyncio.Queue(), output_token_ids=list(output_token_ids))  # fmt: skip
        self.requests[request_id] = req
        if import_kv:
            hits, num_hit_tokens = self.cache.get_computed_blocks(req, max_tokens=req.num_prompt_tokens)
            if self.cache.allocate_slots(req, req.num_prompt_tokens - num_hit_tokens, hits):
                req.num_cached_tokens, req.state = num_hit_tokens, IMPORTING
                self.importing[request_id] = req
                req.queue.put_nowait(SimImport(request_id, tuple(req.block_ids), num_hit_tokens, self.cache.block_size))
            else:  # no room to import: computed here instead
                req.queue.put_nowait(SimImport(request_id, (), 0, self.cache.block_size, recompute=True))
                self.scheduler.add(req)
        else:
            self.scheduler.add(req)
        self._changed()
        return SimStream(self, req)

    def _abandon(self, req: SimRequest) -> None:
        """The request's consumer went away before its last output: free what it holds. Mutates."""
        if req.state != FINISHED:
            req.finish_reason = "abort"
            self._finish(req)
        elif req.pinned is not None and self.pinned.get(req.request_id) is req.pinned:
            self.release_pinned(req.request_id)  # pinned for a handle nobody received

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is and free its blocks (its stream gets a final 'abort'). Mutates."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = "abort"
        self._finish(req)
        return True

    def complete_kv_import(self, request_id: str, ok: bool) -> None:
        """The import's missing blocks arrived (ok: they join the prefix cache, decoding goes on from
        the first token) or will not (free them and compute the prompt here). Mutates; a request
        aborted meanwhile is ignored."""
        req = self.importing.pop(request_id, None)
        if req is None:
            return
        if ok:
            req.num_computed_tokens = req.num_prompt_tokens
            self.cache.cache_computed_blocks(req)
        else:
            self.cache.free(req)
            req.num_cached_tokens = None
        self.scheduler.add(req)
        self._changed()

    def release_pinned(self, request_id: str) -> bool:
        """Let go of a prefilled prompt's blocks (they stay in the prefix cache). Mutates."""
        pinned = self.pinned.pop(request_id, None)
        if pinned is None:
            return False
        self.cache.free_blocks(list(reversed(pinned.block_ids)))
        self._changed()
        return True

    def stats(self) -> SimStats:
        sched = self.scheduler
        return SimStats(len(sched.running), len(sched.waiting) + len(self.importing), self.cache.num_used_blocks, self.cache.num_blocks,
                        sched.num_pending_prefill_tokens())  # fmt: skip

    # ---- the step loop ----------------------------------------------------------------------------

    def _changed(self) -> None:
        self._dirty = True
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._publish()
            scheduled, preempted = self.scheduler.schedule() if self.scheduler.has_work() else ([], 0)
            self._dirty |= bool(preempted)
            if not scheduled:  # idle, or nothing fits until a pin or an import ends
                self._publish()
                self._wake.clear()
                await self._wake.wait()
                continue
            start = loop.time()
            seconds = self.scheduler.step_seconds(scheduled)
            self.busy_seconds += seconds
            await asyncio.sleep(max(0.0, start + seconds - loop.time()))
            self._apply(scheduled)

    def _publish(self) -> None:
        if not (self._dirty or self.cache.has_events):
            return
        self._dirty = False
        events = self.cache.take_events()
        if self._observer is not None:
            self._observer(self.stats(), events)

    def _apply(self, scheduled: list[tuple[SimRequest, int]]) -> None:
        """The step's results: computed tokens, published blocks, sampled tokens. Mutates."""
        self.num_steps += 1
        self._dirty = True
        for req, n in scheduled:
            if req.state != RUNNING:  # aborted while the step ran
                continue
            req.num_computed_tokens += n
            self.cache.cache_computed_blocks(req)
            if req.num_computed_tokens < req.num_tokens:  # a prefill chunk; the prompt goes on next step
                continue
            token = req.next_token(self.vocab_size)
            req.output_token_ids.append(token)
            if token in req.stop_token_ids:
                req.finish_reason, req.stop_token_id = "stop", token
            elif len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
                req.finish_reason = "length"
            if req.finish_reason is not None:
                self._finish(req)
            elif req.prefill_only:
                self._finish(req, pin=True)
            else:
                req.queue.put_nowait(self._output(req, [token], finished=False))

    def _output(self, req: SimRequest, new: list[int], finished: bool) -> SimOutput:
        return SimOutput(req.request_id, new, finished, req.finish_reason, req.stop_token_id, req.num_prompt_tokens,
                         len(req.output_token_ids), req.num_cached_tokens or 0)  # fmt: skip

    def _finish(self, req: SimRequest, pin: bool = False) -> None:
        """End `req` (finished, aborted, or a prefill whose prompt blocks are pinned); its final
        output goes to its stream. Mutates."""
        pinned = None
        if pin:
            num_blocks = -(-req.num_prompt_tokens // self.cache.block_size)
            full = req.num_prompt_tokens // self.cache.block_size
            pinned = PinnedBlocks(req.request_id, tuple(req.block_ids[:num_blocks]), tuple(req.block_hashes[:full]), req.num_prompt_tokens)
            self.cache.touch(list(pinned.block_ids))  # one more reference: survives the free below
            self.pinned[req.request_id] = req.pinned = pinned
        new = [req.output_token_ids[-1]] if (req.output_token_ids and req.finish_reason != "abort") else []
        out = self._output(req, new, finished=True)
        out.pinned = pinned
        self._remove(req)
        req.queue.put_nowait(out)

    def _remove(self, req: SimRequest) -> None:
        if req.state == IMPORTING:
            del self.importing[req.request_id]
        else:
            self.scheduler.remove(req)
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
        self.cache.free(req)
        req.state = FINISHED
        self._changed()

    # ---- invariants ----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise AssertionError if requests, pins and the cache disagree. Does not mutate."""
        where = {WAITING: {id(r) for r in self.waiting}, RUNNING: {id(r) for r in self.running}, IMPORTING: {id(r) for r in self.importing.values()}}
        assert sum(map(len, where.values())) == len(self.requests), (
            f"{len(self.requests)} live requests, but {len(self.waiting)} waiting + {len(self.running)} running + {len(self.importing)} importing"
        )
        assert len(self.running) <= self.timing.max_num_seqs, f"{len(self.running)} running over max_num_seqs {self.timing.max_num_seqs}"
        refs: Counter[int] = Counter()
        bs = self.cache.block_size
        for rid, req in self.requests.items():
            assert req.request_id == rid and id(req) in where[req.state], f"request {rid} is not where its state ({req.state}) says"
            assert req.num_computed_tokens <= req.num_tokens, f"request {rid} computed {req.num_computed_tokens} of {req.num_tokens} tokens"
            assert len(req.block_ids) * bs >= req.num_computed_tokens, f"request {rid} computed past its {len(req.block_ids)} blocks"
            assert len(set(req.block_ids)) == len(req.block_ids), f"request {rid} holds a block twice"
            refs.update(req.block_ids)
        for pinned in self.pinned.values():
            refs.update(pinned.block_ids)
        self.cache.check_integrity(expected_refs=refs)
