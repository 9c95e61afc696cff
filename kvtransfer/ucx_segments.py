"""The KV cache as UCX messages: block-major storage, and the segments one pull is sent in.

The engine's cache is [num_blocks, layers, 2, kv heads, block size, head dim] (services/engine/
kv_cache.py), so block b is bytes [b · block_bytes, (b + 1) · block_bytes) of one tensor, and
blocks b..b+n-1 are one contiguous range. A pull is sent as segments, each a run of blocks that
is consecutive on both sides (source ids b..b+n-1 into destination ids d..d+n-1), at most
`max_blocks` long: one UCX tagged message per segment, read straight out of the server's cache
and written straight into the client's, with no staging copy on either side. (The layout before,
layer-major, made a block num_layers · 2 · kv heads separate 4 KiB runs; pulls gathered them into
staging buffers, moved those, and scattered them back: three copy passes at 4.3 GB/s, where the
transfer alone runs at 13-16 GB/s on one host.)
"""

from __future__ import annotations

import numpy as np
import torch

from .ucx_protocol import Layout

DEFAULT_SEGMENT_BYTES = 32 << 20  # the largest message: big enough that UCX's per-message handshake is noise


def layout_of(storage: torch.Tensor) -> Layout:
    if storage.device.type != "cpu" or not storage.is_contiguous() or storage.dim() != 6 or storage.shape[2] != 2:
        raise ValueError(
            f"KV storage must be a contiguous CPU tensor [num_blocks, L, 2, kv_heads, block_size, head_dim], got {tuple(storage.shape)} on {storage.device}"
        )
    _, L, _, H, bs, D = storage.shape
    return Layout(L, H, bs, D, storage.element_size(), str(storage.dtype).removeprefix("torch."))


def block_bytes_view(storage: torch.Tensor) -> np.ndarray:
    """The storage as a numpy [num_blocks, block_bytes] uint8 view (no copy): what UCX reads and writes."""
    return storage.view(torch.uint8).view(storage.shape[0], -1).numpy()


def segments(src: list[int], dst: list[int], max_blocks: int) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, count) for each run that is consecutive on
    both sides, in order, none longer than max_blocks."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if out:
            s0, d0, n = out[-1]
            if s == s0 + n and d == d0 + n and n < max_blocks:
                out[-1] = (s0, d0, n + 1)
                continue
        out.append((s, d, 1))
    return out


def segment_buffer(blocks: np.ndarray, first: int, count: int) -> np.ndarray:
    """Blocks first..first+count-1 as one flat byte array over the cache (no copy)."""
    return blocks[first : first + count].reshape(-1)
