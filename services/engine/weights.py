"""Loads a Hugging Face checkpoint directory into the engine's fused weight layout.

Accepts one `model.safetensors` or many shards (with or without `model.safetensors.index.json`).
Fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` at load time, so the model runs one
matmul where the checkpoint has three (or two).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .model_config import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {model_dir} holds no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    tensors[name] = st.get_tensor(name)
    return tensors


def load_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    raw = _read_checkpoint(Path(model_dir))

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise ValueError(f"checkpoint in {model_dir} is missing tensor '{name}' for {cfg.architecture}")
        return raw.pop(name).to(dtype).contiguous()

    out = {"model.embed_tokens.weight": take("model.embed_tokens.weight"), "model.norm.weight": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    raw.pop("lm_head.weight", None)  # tied checkpoints sometimes store a copy

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[p + "qkv_proj.weight"] = torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")])
        if cfg.attention_bias:
            out[p + "qkv_proj.bias"] = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
        out[p + "o_proj.weight"] = take(a + "o_proj.weight")
        if cfg.qk_norm:
            out[p + "q_norm.weight"] = take(a + "q_norm.weight")
            out[p + "k_norm.weight"] = take(a + "k_norm.weight")
        m = p + "mlp."
        out[p + "gate_up_proj.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
        out[p + "down_proj.weight"] = take(m + "down_proj.weight")
        out[p + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")

    leftovers = [k for k in raw if not k.startswith("model.layers.") or int(k.split(".")[2]) < cfg.num_layers]
    if leftovers:
        raise ValueError(f"checkpoint in {model_dir} has tensors this {cfg.architecture} loader does not use: {leftovers[:5]}")
    return out
