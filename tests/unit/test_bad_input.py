"""Every bad input is a ValueError that names the field and its allowed range; nothing stays allocated."""

from __future__ import annotations

import json

import pytest

from services.engine import LLM, EngineConfig, SamplingParams
from services.engine.model_config import ModelConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, r"temperature must be a finite number in \[0, 100\]"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, r"top_k must be -1 \(disabled\) or an integer >= 1"),
        ({"top_k": 0}, r"top_k must be -1"),
        ({"max_tokens": 0}, r"max_tokens must be an integer >= 1"),
        ({"logprobs": 50}, r"logprobs must be an integer in \[0, 20\]"),
        ({"stop": [""]}, r"stop\[0\] must be a non-empty string of at most 1024 characters"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=32, max_model_len=256)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], SamplingParams(), r"prompt must not be empty"),
        ([5, 384, 6], SamplingParams(), r"prompt_token_ids\[1\] = 384 is outside the vocabulary \[0, 384\)"),
        ([5, -1], SamplingParams(), r"prompt_token_ids\[1\] = -1 is outside the vocabulary"),
        ([5] * 256, SamplingParams(), r"prompt is 256 tokens but the model's context \(max_model_len\) is 256"),
    ],
)
def test_bad_prompts_rejected_and_nothing_leaks(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt_token_ids=[[7, 8, 9], prompt], sampling_params=params)
    llm.engine.check_integrity()
    assert not llm.engine.requests and llm.engine.kv.pool.num_used_blocks == 0


def test_request_larger_than_the_kv_pool(tiny_llama):
    small = LLM(model=str(tiny_llama), block_size=16, num_kv_blocks=8)  # 128 tokens of KV
    with pytest.raises(ValueError, match=r"\(140 tokens\) needs 9 KV blocks but the cache has 8; lower max_tokens"):
        small.generate(prompt_token_ids=[[5] * 100], sampling_params=SamplingParams(max_tokens=40))
    small.engine.check_integrity()
    assert small.engine.kv.pool.num_used_blocks == 0


def _write_config(tmp_path, **fields):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    cfg.update(fields)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"architecture 'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM"):
        ModelConfig.from_dir(_write_config(tmp_path, architectures=["GPT2LMHeadModel"]))


def test_missing_config_and_missing_field(tmp_path):
    with pytest.raises(ValueError, match=r"has no config.json"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(ValueError, match=r"missing required field 'vocab_size'"):
        ModelConfig.from_dir(_write_config(tmp_path, vocab_size=None))


def test_missing_model_directory():
    with pytest.raises(ValueError, match=r"is not a directory"):
        LLM(model="/nonexistent/model")


def test_rope_spellings_and_dtype_spellings(tmp_path):
    old = ModelConfig.from_dict(json.loads((_write_config(tmp_path, rope_theta=5e5, torch_dtype="bfloat16") / "config.json").read_text()))
    new = ModelConfig.from_dict(
        json.loads((_write_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, dtype="bfloat16") / "config.json").read_text())
    )
    assert old.rope == new.rope and old.dtype == new.dtype
    llama3 = ModelConfig.from_dict(
        {
            **json.loads((tmp_path / "config.json").read_text()),
            "rope_parameters": None,
            "rope_theta": 5e5,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        }
    )
    assert llama3.rope.rope_type == "llama3" and llama3.rope.factor == 8.0
    with pytest.raises(ValueError, match=r"rope type 'yarn' is not supported"):
        ModelConfig.from_dict({**json.loads((tmp_path / "config.json").read_text()), "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})


def test_engine_config_validation():
    with pytest.raises(ValueError, match=r"block_size must be a power of two"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match=r"num_threads must be >= 1"):
        EngineConfig(num_threads=0)
