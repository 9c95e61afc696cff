"""The engine against the oracle (transformers, fp32, token ids in) on tiny random models."""

from __future__ import annotations

import random

import pytest

from services.engine import LLM, SamplingParams
from tests.helpers.tiny_models import hf_greedy

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def random_prompts(lengths, seed=0, vocab=384):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_greedy_matches_transformers(arch, tiny_model_dirs):
    model_dir = tiny_model_dirs[arch]
    # shorter than a block, exactly one block, one past, many blocks; a budget that forces chunking
    prompts = random_prompts([1, 7, 16, 17, 45, 130])
    expected = hf_greedy(model_dir, prompts, GREEDY.max_tokens)
    llm = LLM(model=str(model_dir), block_size=16, max_num_batched_tokens=48, num_kv_blocks=256)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    for prompt, out, ref in zip(prompts, outs, expected):
        assert out.token_ids == ref, f"{arch}: prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length"
    llm.engine.check_integrity()


def test_warm_prefix_cache_matches_cold_and_computes_only_uncached(tiny_llama):
    prompt = random_prompts([100], seed=3)[0]
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=128)
    runner = llm.engine.runner

    before = runner.num_forward_tokens
    cold = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    cold_tokens = runner.num_forward_tokens - before
    assert cold.num_cached_tokens == 0
    assert cold_tokens == len(prompt) + GREEDY.max_tokens - 1

    before = runner.num_forward_tokens
    warm = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    warm_tokens = runner.num_forward_tokens - before
    assert warm.token_ids == cold.token_ids
    assert warm.num_cached_tokens == 96  # six full blocks of the 100-token prompt
    assert warm_tokens == (len(prompt) - 96) + GREEDY.max_tokens - 1
    llm.engine.check_integrity()


def test_shared_prefix_across_requests_hits_cache(tiny_llama):
    system = random_prompts([64], seed=5)[0]
    a, b = (system + q for q in random_prompts([10, 12], seed=6))
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=128)
    first = llm.generate(prompt_token_ids=[a], sampling_params=GREEDY)[0]
    second = llm.generate(prompt_token_ids=[b], sampling_params=GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 64
    assert second.token_ids == hf_greedy(tiny_llama, [b], GREEDY.max_tokens)[0]


def test_full_prompt_hit_still_computes_last_token(tiny_llama):
    prompt = random_prompts([32], seed=9)[0]  # exactly two blocks
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=64)
    cold = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    warm = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    assert warm.num_cached_tokens == 16  # the block holding the last token is recomputed
    assert warm.token_ids == cold.token_ids


def test_preemption_under_a_tiny_pool_gives_identical_outputs(tiny_llama):
    prompts = random_prompts([30, 41, 25, 50, 33, 28], seed=11)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = hf_greedy(tiny_llama, prompts, params.max_tokens)
    # each request alone needs up to 6 blocks of 16; 12 blocks cannot hold six at once
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=12, max_num_batched_tokens=64)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert [o.token_ids for o in outs] == expected
    llm.engine.check_integrity()


def test_pool_whole_after_abort(tiny_llama):
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=64)
    core = llm.engine
    for i, p in enumerate(random_prompts([40, 70, 5], seed=2)):
        core.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0))
    core.step()
    core.step()
    assert core.kv.pool.num_used_blocks > 0
    for i in range(3):
        assert core.abort(f"r{i}")
    finals = [o for o in core.step() if o.finished]
    assert sorted(o.request_id for o in finals) == ["r0", "r1", "r2"]
    assert all(o.finish_reason == "abort" for o in finals)
    core.check_integrity()
    assert core.kv.pool.num_used_blocks == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama):
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=128)
    prompt = random_prompts([20], seed=4)[0]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompt], sampling_params=seeded)[0].token_ids
    others = random_prompts([15, 33], seed=8)
    crowd = llm.generate(
        prompt_token_ids=[others[0], prompt, others[1]],
        sampling_params=[SamplingParams(max_tokens=16, temperature=1.0), seeded, SamplingParams(max_tokens=5)],
    )[1].token_ids
    assert alone == crowd
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert llm.generate(prompt_token_ids=[prompt], sampling_params=other_seed)[0].token_ids != alone


def test_top_k_one_equals_greedy_and_logprobs(tiny_llama):
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=64)
    prompt = random_prompts([12], seed=21)[0]
    greedy = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    topk1 = SamplingParams(max_tokens=20, temperature=0.7, top_k=1, ignore_eos=True, logprobs=3)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=topk1)[0]
    assert out.token_ids == greedy.token_ids
    assert len(out.logprobs) == 20
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the top logprob
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_stop_token_ids_and_eos(tiny_llama):
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=64)
    prompt = random_prompts([10], seed=13)[0]
    ref = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
    stop_at = ref[5]
    first = ref.index(stop_at)
    out = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at], ignore_eos=True),
    )[0]
    assert out.token_ids == ref[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_max_model_len_finishes_with_length(tiny_llama):
    llm = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=64, max_model_len=40)
    out = llm.generate(prompt_token_ids=random_prompts([30], seed=1), sampling_params=SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10
