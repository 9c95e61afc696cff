"""SimScheduler: services/engine/scheduler.py's decisions on simulated requests, and what the
step they make costs under the TimingModel.

Each step:
  1. running requests, oldest first, get their next tokens (1 for a decode, a chunk for an
     unfinished prefill). When the cache cannot hold them, the newest running request is
     preempted by recompute (blocks freed, back to the front of the queue, num_computed 0).
  2. if nothing was preempted, waiting requests are admitted in arrival order while budget,
     max_num_seqs and blocks allow, each from its longest cached prefix (or, imported, with its
     KV already in place); a prompt longer than the remaining budget is cut into chunks, unless
     its rest overruns the budget by at most an eighth: then it runs whole (the engine's
     tail allowance).
A waiting request that does not fit waits for blocks (pins and imports end, requests finish);
validation excludes one that could never fit, where the real engine would raise.
Event-loop only.
"""

from __future__ import annotations

from collections import deque

from .kv_cache import SimKVCache
from .request import RUNNING, WAITING, SimRequest
from .timing import TimingModel

Scheduled = list[tuple[SimRequest, int]]  # (request, tokens it computes this step)


class SimScheduler:
    def __init__(self, cache: SimKVCache, timing: TimingModel):
        self.cache, self.timing = cache, timing
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.num_preemptions = 0
        self.tail_allowance = timing.max_num_batched_tokens // 8

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: SimRequest) -> None:
        req.state = WAITING
        self.waiting.append(req)

    def remove(self, req: SimRequest) -> None:
        """Take a finished or aborted request out of the queues (its blocks are the caller's). Mutates."""
        if req.state == RUNNING:
            self.running.remove(req)
        elif req.state == WAITING:
            self.waiting.remove(req)

    def schedule(self) -> tuple[Scheduled, int]:
        """The next step's requests and token counts, and how many were preempted. Mutates
        (allocation, preemption, admission)."""
        budget, scheduled, preempted = self.timing.max_num_batched_tokens, [], 0
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            while not self.cache.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.timing.max_num_seqs:
                req = self.waiting[0]
                if req.block_ids:  # its KV is in place already (imported)
                    hits, num_hit_tokens = [], req.num_computed_tokens
                else:
                    hits, num_hit_tokens = self.cache.get_computed_blocks(req)
                num_new = self._chunk(req.num_tokens - num_hit_tokens, budget)
                if not self.cache.allocate_slots(req, num_new, hits):
                    break
                self.waiting.popleft()
                req.num_computed_tokens = num_hit_tokens
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = num_hit_tokens
                req.state = RUNNING
                self.running.append(req)
                scheduled.append((req, num_new))
                budget -= num_new
        self.num_preemptions += preempted
        return scheduled, preempted

    def _chunk(self, remaining: int, budget: int) -> int:
        """The engine's Scheduler._chunk: all of `remaining` if it fits the budget plus the tail allowance."""
        return remaining if remaining <= budget + self.tail_allowance else min(remaining, budget)

    def _preempt(self, req: SimRequest) -> None:
        self.cache.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.state = WAITING
        self.waiting.appendleft(req)

    def step_seconds(self, scheduled: Scheduled) -> float:
        """What the step costs: a 1-token step past the prompt is a decode (attending to its
        length), anything else prefill tokens (attending to what precedes each). Does not mutate."""
        prefill = prefill_ctx = decode = decode_ctx = 0
        for req, n in scheduled:
            if n == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                decode += 1
                decode_ctx += req.num_computed_tokens + 1
            else:
                prefill += n
                prefill_ctx += TimingModel.prefill_pairs(req.num_computed_tokens, n)
        return self.timing.step_seconds(prefill, decode, prefill_ctx, decode_ctx)

    def num_pending_prefill_tokens(self) -> int:
        """Prompt tokens of queued and running requests not computed yet. Does not mutate."""
        return sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in (*self.waiting, *self.running))
