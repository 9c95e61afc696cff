"""EngineConfig: every knob of one engine instance, with the defaults a 2-core CPU host wants."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str = "default"  # a Hugging Face model directory, or "default" for the embedded SmolLM2
    dtype: str = "auto"  # auto (the checkpoint's dtype, float32 for the default) | float32 | bfloat16
    block_size: int = 16  # tokens per KV block; also the prefix-cache granularity
    kv_cache_memory_gb: float = 2.0  # memory for the paged KV cache
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb (tests use tiny pools)
    max_num_batched_tokens: int = 2048  # token budget per step (decodes + prefill chunks)
    max_num_seqs: int = 128  # running sequences at once
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's setting alone
    device: str = "cpu"
    model_id: str | None = None  # the name block hashes are seeded with; defaults to the model path/name

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
