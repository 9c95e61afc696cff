"""The Llama-family decoder: Llama, Mistral, SmolLM, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

It runs on a flat batch of tokens from many sequences at once (no padding): every linear layer
sees [num_tokens, hidden], and only attention, behind the backend interface, knows which token
belongs to which sequence. q/k/v and gate/up are fused into one matmul each (fewer, larger
matmuls run closer to the machine's peak). Logits are computed only for the rows the sampler
needs (the last token of each sequence), which skips the LM head for the rest of a prompt.

Numerics follow transformers' implementation step for step (RMSNorm in float32, RoPE tables from
float32) so that greedy decoding matches it token for token in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.backend import AttentionBackend
from ..model_config import ModelConfig
from .rope import RotaryEmbedding


# matmuls with at most this many rows go to the small-batch kernel: fp32 measured faster up to 8
# rows; torch's bf16 path is good from 2 rows on, so bf16 uses the kernel for single rows only
SMALL_BATCH_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 1}


class Linear:
    """F.linear, except decode steps with few rows use the small-batch CPU kernel.

    torch's CPU GEMV reads weights at ~16 GB/s on one thread; the kernel splits output rows over
    threads and streams W at close to memory bandwidth (3-4x faster at M = 1..4 here)."""

    def __init__(self, small_batch_kernel):
        self.kernel = small_batch_kernel

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None and x.shape[0] <= SMALL_BATCH_MAX_ROWS.get(x.dtype, 0) and x.is_contiguous():
            return self.kernel(x, w, b)
        return F.linear(x, w, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], linear: Linear):
        self.cfg = cfg
        self.linear = linear
        self.input_norm = weights["input_layernorm.weight"]
        self.post_attn_norm = weights["post_attention_layernorm.weight"]
        self.qkv = weights["qkv_proj.weight"]
        self.qkv_bias = weights.get("qkv_proj.bias")
        self.o_proj = weights["o_proj.weight"]
        self.q_norm = weights.get("q_norm.weight")
        self.k_norm = weights.get("k_norm.weight")
        self.gate_up = weights["gate_up_proj.weight"]
        self.down = weights["down_proj.weight"]
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    def forward(self, hidden, cos, sin, rope: RotaryEmbedding, k_cache, v_cache, meta, backend: AttentionBackend):
        cfg = self.cfg
        num_tokens = hidden.shape[0]
        residual = hidden
        h = rms_norm(hidden, self.input_norm, cfg.rms_norm_eps)
        qkv = self.linear(h, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        attn = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        hidden = residual + self.linear(attn, self.o_proj)

        residual = hidden
        h = rms_norm(hidden, self.post_attn_norm, cfg.rms_norm_eps)
        gate, up = self.linear(h, self.gate_up).chunk(2, dim=-1)
        return residual + self.linear(F.silu(gate) * up, self.down)


class LlamaForCausalLM:
    """Inference-only model over a paged KV cache. Holds no per-request state."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype):
        self.cfg = cfg
        self.dtype = dtype
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        kernel = None
        if dtype in SMALL_BATCH_MAX_ROWS and self.embed.device.type == "cpu":
            from ..cpu_kernels import load_small_batch_linear

            kernel = load_small_batch_linear()
        self.linear = Linear(kernel)
        self.layers = [
            DecoderLayer(cfg, {k.split(".", 3)[3]: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}, self.linear)
            for i in range(cfg.num_layers)
        ]
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] long
        positions: torch.Tensor,  # [T] long
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: object,
        backend: AttentionBackend,
        logits_indices: torch.Tensor,  # [N] rows of the batch whose next-token logits are wanted
    ) -> torch.Tensor:  # [N, vocab] in the model's dtype (the sampler widens the rows it samples)
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.rope.lookup(positions)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = layer.forward(hidden, cos, sin, self.rope, k_cache, v_cache, meta, backend)
        hidden = rms_norm(hidden[logits_indices], self.norm, self.cfg.rms_norm_eps)
        return self.linear(hidden, self.lm_head)
