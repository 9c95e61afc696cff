"""The engine on the embedded SmolLM2-135M against the oracle: transformers loading the GGUF, fp32,
token ids in, greedy. Identical tokens, batched, including a chat prompt through the template."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 5, 8, 13,",
]
CHAT = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(model=str(default_model_dir), dtype="float32", kv_cache_memory_gb=0.25, max_num_batched_tokens=64)


def oracle_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_matches_transformers_token_for_token(llm, oracle_model, oracle_tokenizer):
    tok = llm.tokenizer
    chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat_text == oracle_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = [tok.encode(p) for p in PROMPTS] + [tok.encode(chat_text, add_special_tokens=False)]
    for ids, text in zip(prompt_ids, PROMPTS):
        assert ids == oracle_tokenizer.encode(text, add_special_tokens=False)

    # batched, mixed lengths, prefill chunked by a 64-token budget; EOS ends a request as it ends transformers'
    outs = llm.generate(prompt_token_ids=prompt_ids, sampling_params=SamplingParams(max_tokens=NUM_TOKENS, temperature=0))
    for ids, out in zip(prompt_ids, outs):
        assert out.token_ids == oracle_greedy(oracle_model, ids, NUM_TOKENS), f"diverged for prompt {tok.decode(ids)!r}"
    assert "<|im_end|>" not in outs[-1].text and outs[-1].text.strip(), "chat answer should be plain text"
    llm.engine.check_integrity()


def test_text_streams_equal_full_decode_and_stop_strings(llm):
    prompt = "Write the numbers from one to ten in words: one, two,"
    base = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0))[0]
    assert base.text == llm.tokenizer.decode(base.token_ids)
    stop_word = " five"
    assert stop_word in base.text, base.text
    out = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop_word]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_word
    assert out.text == base.text[: base.text.index(stop_word)]
    kept = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop_word], include_stop_str_in_output=True))[0]
    assert kept.text.endswith(stop_word)


async def test_async_stream_never_shows_a_stop_string(default_model_dir):
    from services.engine import AsyncEngine, EngineConfig

    eng = AsyncEngine(EngineConfig(model=str(default_model_dir), kv_cache_memory_gb=0.25))
    try:
        ids = eng.tokenizer.encode("Count: one, two, three, four,")
        stream = await eng.add_request("s", ids, SamplingParams(max_tokens=30, temperature=0, stop=[" six"]))
        deltas = [o.delta_text async for o in stream]
        text = "".join(deltas)
        assert " six" not in text and text.rstrip().endswith("five,"), text
    finally:
        await eng.shutdown()
    eng.check_integrity()


def test_multibyte_characters_stream_intact(llm):
    prompt = "Translate to Japanese: good morning →"
    core = llm.engine
    ids = llm.tokenizer.encode(prompt)
    core.add_request("mb", ids, SamplingParams(max_tokens=24, temperature=0))
    deltas, final = [], None
    while core.has_work():
        for o in core.step():
            deltas.append(o.delta_text)
            final = o
    assert "".join(deltas) == final.text == llm.tokenizer.decode(final.token_ids)
    assert "\ufffd" not in final.text
