"""The KV cache's memory: one tensor holding every layer's keys and values for every block.

    storage: [num_layers, 2 (k, v), num_kv_heads, num_blocks, block_size, head_dim]

KV-head-major inside a layer so attention can gather a batch's blocks straight into the
[kv_heads, batch, context, head_dim] layout its matmuls want (see attention/torch_backend.py).
A block is therefore not one contiguous range: it is num_layers × 2 × num_kv_heads runs of
block_size × head_dim elements. `gather_blocks`/`scatter_blocks` copy whole blocks out of and into
that layout, for the KV transfer between prefill and decode workers.
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
        self.storage = torch.empty(cfg.num_layers, 2, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim, dtype=dtype, device=device)
        self.huge_pages = advise_huge_pages(self.storage)  # before the first touch
        self.storage.zero_()
        self.layers = [(self.storage[i, 0], self.storage[i, 1]) for i in range(cfg.num_layers)]

    @staticmethod
    def blocks_for_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, memory_bytes: float) -> int:
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype)
        return max(1, int(memory_bytes // layout.bytes_per_block))

    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy blocks out: [num_layers, 2, num_kv_heads, len(block_ids), block_size, head_dim]."""
        return self.storage[:, :, :, torch.tensor(block_ids, dtype=torch.long)]

    def scatter_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Copy blocks in (the inverse of gather_blocks). Mutates the cache."""
        self.storage[:, :, :, torch.tensor(block_ids, dtype=torch.long)] = data
