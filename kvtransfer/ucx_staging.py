"""Block staging: gather KV blocks into contiguous chunks and scatter them back.

The KV cache is [L, 2, kv_heads, num_blocks, block_size, head_dim], so one block is L·2·kv_heads
separate runs of block_size·head_dim elements (4 KiB for fp32, block 16, head_dim 64). Moving
blocks as UCX descriptor lists (one-sided reads, one per run) measured 1.0 GB/s with 4 KiB runs
on nixl, the per-descriptor cost dominating; copying into a contiguous staging chunk runs at
7-14 GB/s per core (random / consecutive block ids) and lets UCX move one large message per chunk
at 13-16 GB/s. Chunks are block-major ([blocks, runs, run_bytes]) so a chunk is a prefix of whole
blocks and each copy is one strided copy per run of consecutive block ids.

Staging buffers are pre-faulted and pooled; a buffer whose transfer failed is never pooled again
(a UCX read of it may still be in flight when the failure is noticed).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .ucx_protocol import Layout

DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_SLOTS = 2  # chunks in flight per transfer: copy one while UCX moves the other


def layout_of(storage: torch.Tensor) -> Layout:
    if storage.device.type != "cpu" or not storage.is_contiguous() or storage.dim() != 6 or storage.shape[1] != 2:
        raise ValueError(
            f"KV storage must be a contiguous CPU tensor [L, 2, kv_heads, num_blocks, block_size, head_dim], got {tuple(storage.shape)} on {storage.device}"
        )
    L, _, H, _, bs, D = storage.shape
    return Layout(L, H, bs, D, storage.element_size(), str(storage.dtype).removeprefix("torch."))


def run_view(storage: torch.Tensor) -> np.ndarray:
    """The storage's bytes as a numpy [runs, num_blocks, run_bytes] uint8 view (no copy).

    numpy, not torch, does the copies: single-threaded memcpy per run, no OpenMP thread pool
    spinning against the engine's own torch threads and UCX's progress thread."""
    L, _, H, nb, bs, D = storage.shape
    return storage.view(torch.uint8).view(L * 2 * H, nb, bs * D * storage.element_size()).numpy()


def _ranges(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first block, count) for each run of consecutive block ids."""
    out: list[tuple[int, int, int]] = []
    for j, b in enumerate(ids):
        if out and out[-1][1] + out[-1][2] == b:
            p, s, n = out[-1]
            out[-1] = (p, s, n + 1)
        else:
            out.append((j, b, 1))
    return out


def gather(runs: np.ndarray, ids: list[int], dst: np.ndarray) -> None:
    """dst[j] = block ids[j] for each j; runs is run_view(), dst is [len(ids), runs, run_bytes] uint8."""
    for j, b, n in _ranges(ids):
        np.copyto(dst[j : j + n], runs[:, b : b + n].transpose(1, 0, 2))


def scatter(runs: np.ndarray, ids: list[int], src: np.ndarray) -> None:
    """Block ids[j] = src[j] for each j (the inverse of gather)."""
    for j, b, n in _ranges(ids):
        np.copyto(runs[:, b : b + n], src[j : j + n].transpose(1, 0, 2))


class StagingPool:
    """Pre-faulted byte buffers of one size, each holding `slots` chunks of `chunk_blocks` blocks."""

    def __init__(self, layout: Layout, chunk_bytes: int = DEFAULT_CHUNK_BYTES, slots: int = DEFAULT_SLOTS, keep: int = 4):
        self.layout = layout
        self.chunk_blocks = max(1, chunk_bytes // layout.block_bytes)
        self.slots = slots
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def slot_bytes(self) -> int:
        return self.chunk_blocks * self.layout.block_bytes

    def take(self) -> Staging:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = np.ones(self.slots * self.slot_bytes, dtype=np.uint8)  # written: faulted in now
        lay, n = self.layout, self.chunk_blocks
        views = [buf[i * self.slot_bytes : (i + 1) * self.slot_bytes].reshape(n, lay.runs, lay.run_bytes) for i in range(self.slots)]
        return Staging(buf, views)

    def give(self, staging: Staging) -> None:
        """Return a buffer after a transfer that completed (never after a failed one)."""
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(staging.buf)


@dataclass
class Staging:
    buf: np.ndarray
    slots: list[np.ndarray]  # each [chunk_blocks, runs, run_bytes] over buf


def as_ucx_buffer(chunk: np.ndarray) -> np.ndarray:
    """A staging chunk as the flat byte array UCX reads or writes (no copy)."""
    return chunk.reshape(-1)
