"""The KV cache's memory: one tensor holding every layer's keys and values for every block.

    storage: [num_blocks, num_layers, 2 (k, v), num_kv_heads, block_size, head_dim]

Block-major: a block is one contiguous run of `bytes_per_block` bytes, so the KV transport sends
it straight from this memory and receives it straight into it (kvtransfer/ucx_transport.py), with
no gather or scatter copy on either side. Attention sees each layer as strided views
[kv_heads, num_blocks, block_size, head_dim] (`layers`); its kernels read through strides.

Why not layer-major ([num_layers, 2, kv_heads, num_blocks, ...], the layout before): there one
block is num_layers × 2 × kv_heads separate runs, which a transfer has to gather and scatter.
Decode attention measured faster layer-major only while a sequence's blocks sit next to each
other in memory, as in a fresh pool; once a worker's pool has cycled (the LRU free list hands out
blocks in the order old requests freed them) its tables are scattered, and block-major read
them 8-23% faster, its kv heads' rows of one block being neighbours; the engine's decode step was
9-12% faster on an aged pool and ~3% slower on a new one (docs/benchmarks.md, "Block-major KV,
adopted").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .malloc_tuning import advise_huge_pages
from .model_config import ModelConfig


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * elem


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str = "cpu"):
        self.layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype)
        self.num_blocks = num_blocks
        # allocated untouched so huge pages can be requested first, then zeroed: padded decode rows
        # read block 0 under a -inf mask, and NaN garbage there would still poison the softmax's
        # weighted sum (0 × NaN = NaN)
        self.storage = torch.empty(num_blocks, cfg.num_layers, 2, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=dtype, device=device)
        self.huge_pages = advise_huge_pages(self.storage)  # before the first touch
        self.storage.zero_()
        # per layer (k, v), each [kv_heads, num_blocks, block_size, head_dim]: views, no copy
        self.layers = [(self.storage[:, i, 0].transpose(0, 1), self.storage[:, i, 1].transpose(0, 1)) for i in range(cfg.num_layers)]

    @staticmethod
    def blocks_for_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, memory_bytes: float) -> int:
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype)
        return max(1, int(memory_bytes // layout.bytes_per_block))

    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy blocks out: [len(block_ids), num_layers, 2, num_kv_heads, block_size, head_dim]."""
        return self.storage[torch.tensor(block_ids, dtype=torch.long)]

    def scatter_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Copy blocks in (the inverse of gather_blocks). Mutates the cache."""
        self.storage[torch.tensor(block_ids, dtype=torch.long)] = data
