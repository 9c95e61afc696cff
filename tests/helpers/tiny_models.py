"""Tiny random Llama-family checkpoints that tests build and save themselves (no hub, seconds to make).

Weights are drawn with a large initializer range so next-token logits are peaked: with the default
0.02 random models produce near-uniform logits whose argmax flips on rounding noise, which would
test float luck rather than the engine.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random `arch` ('llama' | 'qwen2' | 'qwen3') checkpoint in HF format to out_dir."""
    import transformers

    torch.manual_seed(seed)
    kwargs = {**TINY_COMMON, **overrides}
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**kwargs)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, **kwargs)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model = model.float().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The oracle: transformers, fp32, one prompt at a time (no padding), greedy, EOS ignored."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs
