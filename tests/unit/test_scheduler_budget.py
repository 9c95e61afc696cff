"""The scheduler's token budget: prompts are chunked to it, except a small tail.

On the real Scheduler + KVCacheManager + BlockPool (no model: each step's tokens are counted as
computed, as model_runner does). A prompt whose rest overruns the remaining budget by at most
`tail_allowance` (an eighth of the budget) runs whole; a larger one is cut to the budget. The
burst case: with 8 decodes running, a 2,048-token budget holds 7 prompts of 256 and the 8th's
first 248 tokens; without the allowance the 8th waited a whole step for its last 8 tokens.
"""

from __future__ import annotations

import pytest

from services.engine.kv_cache_manager import KVCacheManager
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler

BLOCK_SIZE = 16


def make_scheduler(budget: int, num_blocks: int = 4096, max_seqs: int = 256) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BLOCK_SIZE, "budget-test", enable_prefix_caching=False), budget, max_seqs)


def add(sched: Scheduler, rid: str, prompt_len: int, seed: int) -> Request:
    req = Request(rid, [(seed * 7919 + i) % 500 + 1 for i in range(prompt_len)], SamplingParams(max_tokens=64, ignore_eos=True), 0.0)
    sched.add(req)
    return req


def step(sched: Scheduler, first_tokens: list[str] | None = None) -> dict[str, int]:
    """One step's {request id: tokens}; appends to `first_tokens` the requests that sampled their first token."""
    out = sched.schedule()
    for s in out.scheduled:  # model_runner.execute: a request whose tokens are all computed samples one
        req = s.request
        req.num_computed_tokens += s.num_new_tokens
        if req.num_computed_tokens == req.num_tokens:
            if not req.output_token_ids and first_tokens is not None:
                first_tokens.append(req.request_id)
            req.output_token_ids.append(1)
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


def test_a_burst_of_256_token_prompts_finishes_eight_prompts_a_step_with_decodes_running():
    sched = make_scheduler(2048)
    for i in range(64):
        add(sched, f"r{i}", 256, i)
    for n in range(8):  # every step after the first also carries the 8 * n running decodes
        first = []
        tokens = step(sched, first)
        assert len(first) == 8, f"step {n + 1}: {len(first)} first tokens"
        assert sum(tokens.values()) == 2048 + 8 * n
    assert not sched.waiting


@pytest.mark.parametrize("running, prompt_len, expect", [
    (0, 2048 + 256, 2048 + 256),   # overruns an empty step by exactly the allowance: whole
    (0, 2048 + 257, 2048),         # one token more: chunked to the budget
    (100, 2000, 2000),             # 1,948 left, overrun 52: whole
    (100, 2300, 1948),             # overrun 352 > 256: chunked to what is left
])  # fmt: skip
def test_a_prompt_runs_whole_when_its_overrun_is_at_most_an_eighth(running, prompt_len, expect):
    sched = make_scheduler(2048)
    for i in range(running):  # one-token prompts: prefilled by the step below, then one decode token a step
        add(sched, f"d{i}", 1, i)
    step(sched)
    add(sched, "p", prompt_len, 999)
    got = step(sched)
    assert sum(v for k, v in got.items() if k.startswith("d")) == running
    assert got["p"] == expect
    assert sum(got.values()) <= 2048 + 2048 // 8


def test_a_chunked_prompt_finishes_under_the_same_rule():
    sched = make_scheduler(1024)
    req = add(sched, "p", 2100, 1)  # 1,024 + 1,076: the second chunk overruns by 52, so it runs whole
    assert step(sched) == {"p": 1024}
    assert step(sched) == {"p": 1076}
    assert req.num_computed_tokens == 2100


def test_the_step_never_exceeds_budget_plus_allowance():
    sched = make_scheduler(512)
    for i, n in enumerate([100, 530, 300, 64, 700, 20, 580, 33]):
        add(sched, f"r{i}", n, i)
    first: list[str] = []
    for _ in range(20):  # bounded: the prompts' 2,327 tokens take 5 steps
        assert sum(step(sched, first).values()) <= 512 + 64
        if len(first) == 8:
            break
    assert len(first) == 8
