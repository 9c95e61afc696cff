"""A request resumed from tokens generated elsewhere (migration, disaggregation) continues exactly
as an uninterrupted run: the same tokens (greedy, and seeded sampling), counted in max_tokens."""

from __future__ import annotations

import pytest

from services.engine import EngineConfig, SamplingParams
from services.engine.engine_core import EngineCore
from services.engine.kv_handoff import Handoff

PROMPT = list(range(3, 30))


@pytest.fixture(scope="module")
def core(tiny_llama):
    return EngineCore(EngineConfig(model=str(tiny_llama), block_size=16, num_kv_blocks=64))


def run(core, request_id, params, output_token_ids=()):
    core.add_request(request_id, PROMPT, params, handoff=Handoff.resume(output_token_ids))
    while True:
        for out in core.step():
            if out.request_id == request_id and out.finished:
                return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=1234, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded-top-k", "seeded-top-p"],
)
@pytest.mark.parametrize("num_resumed", [1, 9])
def test_a_resumed_request_continues_as_the_uninterrupted_one(core, params, num_resumed):
    whole = run(core, f"whole-{num_resumed}", params)
    assert len(whole.token_ids) == 24
    resumed = run(core, f"resumed-{num_resumed}", params, whole.token_ids[:num_resumed])
    assert resumed.token_ids == whole.token_ids  # every token, the carried-over ones first
    assert resumed.finish_reason == "length"  # max_tokens counted the carried-over tokens
    # its prefix-cache hits cover prompt + carried-over tokens; only the prompt's count as cached
    assert resumed.num_cached_tokens <= len(PROMPT)
    core.check_integrity()
