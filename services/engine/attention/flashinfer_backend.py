"""The CUDA attention backend: flashinfer's paged-KV prefill and decode wrappers.

Selected by `select_backend` only when the engine runs on a CUDA device and flashinfer imports;
it is an optional extra (`pip install tandem[cuda]`), never a base dependency, because its CUDA
bindings are large and clash with the UCX stack's on CPU-only machines (DESIGN §6a). No test
on a CPU machine reaches this file; the import guard below keeps it from breaking them.

flashinfer wants the cache as [num_blocks, 2, block_size, kv_heads, head_dim] ("NHD"); the engine's
layout is KV-head-major (kv_cache.py). The adapter below views each layer's K and V as flashinfer's
(k_cache, v_cache) tuple form in "HND" layout, [num_blocks, kv_heads, block_size, head_dim], which is a
permutation of ours without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import flashinfer  # noqa: F401  (ImportError here makes select_backend fall back to torch)
import torch

from .backend import AttentionBackend, SequenceSlice


@dataclass
class FlashInferMetadata:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    wrapper: object  # a planned BatchPrefillWithPagedKVCacheWrapper


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, workspace_bytes: int = 128 * 1024 * 1024):
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device="cuda")
        self._plan_args: tuple | None = None

    def build_metadata(self, slices: list[SequenceSlice], num_tokens: int, block_size: int) -> FlashInferMetadata:
        qo_indptr, kv_indptr, kv_indices, last_len = [0], [0], [], []
        slot_blocks, slot_offsets = [], []
        for s in slices:
            num_blocks = -(-s.context_len // block_size)
            qo_indptr.append(qo_indptr[-1] + s.query_len)
            kv_indptr.append(kv_indptr[-1] + num_blocks)
            kv_indices.extend(s.block_table[:num_blocks])
            last_len.append(s.context_len - (num_blocks - 1) * block_size)
            for pos in range(s.context_len - s.query_len, s.context_len):
                slot_blocks.append(s.block_table[pos // block_size])
                slot_offsets.append(pos % block_size)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, kv_layout="HND")
        as_cuda = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731
        self._plan_args = (as_cuda(qo_indptr), as_cuda(kv_indptr), as_cuda(kv_indices), as_cuda(last_len))
        return FlashInferMetadata(torch.tensor(slot_blocks, device="cuda"), torch.tensor(slot_offsets, device="cuda"), wrapper)

    def forward(self, q, k, v, k_cache, v_cache, metadata: FlashInferMetadata, scale: float):
        m = metadata
        k_cache[:, m.slot_blocks, m.slot_offsets] = k.transpose(0, 1)
        v_cache[:, m.slot_blocks, m.slot_offsets] = v.transpose(0, 1)
        num_heads, head_dim = q.shape[1], q.shape[2]
        if self._plan_args is not None:
            m.wrapper.plan(
                *self._plan_args,
                num_heads,
                k_cache.shape[0],
                head_dim,
                k_cache.shape[2],
                causal=True,
                sm_scale=scale,
                q_data_type=q.dtype,
            )
            self._plan_args = None
        paged = (k_cache.permute(1, 0, 2, 3), v_cache.permute(1, 0, 2, 3))  # HND view, no copy
        return m.wrapper.run(q, paged).reshape(q.shape[0], num_heads * head_dim)
