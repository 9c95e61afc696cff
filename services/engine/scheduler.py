"""Continuous batching under a per-step token budget, with chunked prefill and preemption by recompute.

Each step:
  1. running requests, oldest first, get their next tokens (1 for a decode, a chunk for an
     unfinished prefill). When the pool cannot hold them, the newest running request is preempted
     (blocks freed, back to the front of the queue to be recomputed) until it fits.
  2. if nothing was preempted, waiting requests are admitted in arrival order while budget, the
     sequence limit and KV blocks allow; each starts from its longest cached prefix and a prompt
     longer than the remaining budget is cut into chunks over several steps.
Decodes and prefill chunks share one step, so a long prompt never stalls the streams already running.

The budget is soft by at most an eighth (`tail_allowance`): a prompt whose rest would overrun the
remaining budget by no more than that runs whole in this step instead of leaving a small tail for
the next. The step costs up to 1/8 more; the alternative costs that request a whole extra step
before its first token (a full step of ~2,048 tokens for the tail of a few). In a burst of 256-token
prompts under the server's 2,048-token budget, the running decodes otherwise shift every step's
last prompt by a few tokens into the next step (docs/benchmarks.md, "12-06, later").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_preempted: int

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.tail_allowance = max_num_batched_tokens // 8
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = 0

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[0]
                if req.block_ids:  # its KV is already in place (imported from a prefill worker)
                    hits, num_hit_tokens = [], req.num_computed_tokens
                else:
                    hits, num_hit_tokens = self.kv.get_computed_blocks(req)
                num_new = self._chunk(req.num_tokens - num_hit_tokens, budget)
                if not self.kv.allocate_slots(req, num_new, hits):
                    if not self.running and not scheduled:
                        # even an empty pool cannot hold this request's first chunk: it never will
                        raise MemoryError(
                            f"request {req.request_id} needs more KV blocks than the pool has ({self.kv.pool.num_blocks} blocks of {self.kv.block_size} tokens)"
                        )
                    break
                self.waiting.popleft()
                req.num_computed_tokens = num_hit_tokens
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = num_hit_tokens
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new

        self.num_preemptions += preempted
        return SchedulerOutput(scheduled, preempted)

    def _chunk(self, remaining: int, budget: int) -> int:
        """How many of a request's `remaining` tokens to compute in this step, `budget` tokens left.

        All of them if they fit, or if they overrun the budget by at most `tail_allowance` (finishing
        the prompt now beats a whole extra step for its tail); else a chunk of the budget."""
        return remaining if remaining <= budget + self.tail_allowance else min(remaining, budget)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a request (finished or aborted) wherever it is and free its blocks. Mutates."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
