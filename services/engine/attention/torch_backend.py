"""Paged attention in plain torch: the CPU path every test exercises.

Cache layout per layer (see kv_cache.py): k_cache, v_cache = [num_kv_heads, num_blocks, block_size, head_dim].
Putting the KV head outermost makes the gather of a batch's blocks, `k_cache[:, block_table]`,
come out as [kv_heads, batch, context, head_dim] — already the layout a batched matmul wants, so
the gathered keys are never copied a second time.

Decodes (one query each) run as one padded batch: queries grouped per KV head (GQA without
repeating K/V), scores masked beyond each sequence's context. Each prefill chunk runs on its own
with a causal mask offset by the tokens already cached, through torch's SDPA kernel — or, for bf16 and
fp32 on CPUs with AVX-512 or AVX2, all of a step's prefill chunks in one call of the paged prefill kernel
(csrc/paged_prefill_attention.cpp), which reads the context from the cache blocks in place and ran
1.7-2.8x faster than SDPA on the served shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cpu_kernels import load_paged_decode_attention_module, load_paged_prefill_attention_module
from .backend import AttentionBackend, SequenceSlice


@dataclass
class PrefillChunk:
    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks] long
    causal_mask: torch.Tensor | None  # [query_len, padded_context] bool, None when is_causal suffices


@dataclass
class PrefillBatch:
    """All of a step's prefill chunks as the paged prefill kernel takes them."""

    query_starts: torch.Tensor  # [P] long
    query_lens: torch.Tensor  # [P] long
    context_lens: torch.Tensor  # [P] long
    block_tables: torch.Tensor  # [P, max_blocks] long (padded with block 0)


@dataclass(frozen=True)
class _StepRoute:
    backend: object  # the backend that decided it (metadata built by one backend may be run by another)
    write_kernel: bool  # new keys/values into their slots through the kernel (not an index_put)
    decode_kernel: bool
    prefill_kernel: bool
    decodes_only: bool  # every token is a decode: the decode rows are the whole batch, no slicing


@dataclass
class TorchAttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block id of each new token's KV slot
    slot_offsets: torch.Tensor  # [T] offset inside that block
    num_decodes: int
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks] long (padded with block 0)
    prefills: list[PrefillChunk]
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] long: the kernel's lengths, the fallback's mask
    prefill_batch: PrefillBatch | None = None
    # which kernels this step's layers use, decided at the first layer (every layer has the same dtypes
    # and devices): the checks cost ~10 us a layer, a few percent of a batch-1 decode step
    route: _StepRoute | None = None


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        # fused C++ decode kernel (reads KV blocks in place) and KV slot writer; None when they cannot be built
        kernels = load_paged_decode_attention_module()
        self.decode_kernel = kernels.paged_decode_attention if kernels is not None else None
        self.kv_writer = kernels.write_kv_slots if kernels is not None else None
        prefill = load_paged_prefill_attention_module()
        self.prefill_kernel = prefill.paged_prefill_attention if prefill is not None and prefill.available else None
        self.prefill_head_dims = set(prefill.head_dims) if prefill is not None else set()
        self.prefill_dtypes = {getattr(torch, name) for name in prefill.dtypes} if prefill is not None else set()

    def build_metadata(self, slices: list[SequenceSlice], num_tokens: int, block_size: int) -> TorchAttentionMetadata:
        slot_blocks = torch.empty(num_tokens, dtype=torch.long)
        slot_offsets = torch.empty(num_tokens, dtype=torch.long)
        decodes: list[SequenceSlice] = []
        prefills: list[PrefillChunk] = []
        for s in slices:
            if s.query_len == 1 and not prefills:
                decodes.append(s)
                continue
            if s.query_len == 1 and prefills:
                raise AssertionError("decode sequences must precede prefill chunks in the batch")
            first_pos = s.context_len - s.query_len
            positions = torch.arange(first_pos, s.context_len)
            table = torch.tensor(s.block_table, dtype=torch.long)
            slot_blocks[s.query_start : s.query_start + s.query_len] = table[positions // block_size]
            slot_offsets[s.query_start : s.query_start + s.query_len] = positions % block_size
            num_blocks = -(-s.context_len // block_size)
            padded = num_blocks * block_size
            mask = None
            if first_pos > 0 or padded != s.context_len:
                key_pos = torch.arange(padded)
                mask = key_pos[None, :] <= positions[:, None]
            prefills.append(PrefillChunk(s.query_start, s.query_len, s.context_len, table[:num_blocks], mask))

        decode_table = lens = None
        if decodes:
            # A decode step's 64 sequences from plain ints, a few tensors for all of them: a tensor or two
            # per sequence cost ~2 ms a step (of ~60) at 64 sequences. Decodes lead the batch, one token each.
            first = decodes[0].query_start
            if decodes[-1].query_start != first + len(decodes) - 1:
                raise AssertionError("decode sequences must be adjacent in the batch, one token each")
            context_lens = [s.context_len for s in decodes]
            block_counts = [-(-n // block_size) for n in context_lens]
            max_blocks = max(block_counts)
            rows = [s.block_table[:nb] + [0] * (max_blocks - nb) for s, nb in zip(decodes, block_counts)]
            decode_table = torch.tensor(rows, dtype=torch.long)
            lens = torch.tensor(context_lens, dtype=torch.long)
            last = [n - 1 for n in context_lens]
            slot_blocks[first : first + len(decodes)] = torch.tensor([s.block_table[p // block_size] for s, p in zip(decodes, last)])
            slot_offsets[first : first + len(decodes)] = torch.tensor([p % block_size for p in last])
        batch = None
        if prefills:
            max_blocks = max(len(p.block_table) for p in prefills)
            tables = torch.zeros(len(prefills), max_blocks, dtype=torch.long)
            for i, p in enumerate(prefills):
                tables[i, : len(p.block_table)] = p.block_table
            batch = PrefillBatch(
                torch.tensor([p.query_start for p in prefills], dtype=torch.long),
                torch.tensor([p.query_len for p in prefills], dtype=torch.long),
                torch.tensor([p.context_len for p in prefills], dtype=torch.long),
                tables,
            )
        return TorchAttentionMetadata(slot_blocks, slot_offsets, len(decodes), decode_table, prefills, decode_context_lens=lens, prefill_batch=batch)

    def forward(self, q, k, v, k_cache, v_cache, metadata: TorchAttentionMetadata, scale: float):
        m = metadata
        route = m.route
        if route is None or route.backend is not self:
            route = m.route = self._route(q, k, k_cache, m)
        # write this step's keys/values into their slots: cache[:, block, offset] = k[t]
        if route.write_kernel:
            self.kv_writer(k_cache, v_cache, k, v, m.slot_blocks, m.slot_offsets)
        else:
            k_cache[:, m.slot_blocks, m.slot_offsets] = k.transpose(0, 1)
            v_cache[:, m.slot_blocks, m.slot_offsets] = v.transpose(0, 1)

        num_tokens, num_heads, head_dim = q.shape
        if route.decode_kernel and route.decodes_only:  # a decode step: no row slicing (batch 1 is ~30 layer calls a step)
            out = self.decode_kernel(q, k_cache, v_cache, m.decode_block_table, m.decode_context_lens, scale)
            return out.view(num_tokens, num_heads * head_dim)
        num_kv_heads = k_cache.shape[0]
        group = num_heads // num_kv_heads
        out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype)

        if route.decode_kernel:
            b = m.num_decodes
            self.decode_kernel(q[:b], k_cache, v_cache, m.decode_block_table, m.decode_context_lens, scale, out=out[:b].view(b, num_heads, head_dim))
        elif m.num_decodes:
            b = m.num_decodes
            keys = k_cache[:, m.decode_block_table].flatten(2, 3)  # [kvh, B, L, d]
            values = v_cache[:, m.decode_block_table].flatten(2, 3)
            queries = q[:b].view(b, num_kv_heads, group, head_dim).transpose(0, 1)  # [kvh, B, g, d]
            scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)  # [kvh, B, g, L]
            key_pos = torch.arange(keys.shape[2])  # attend to each sequence's own context only
            attend = (key_pos[None, :] < m.decode_context_lens[:, None]).view(1, b, 1, -1)
            scores.masked_fill_(~attend, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            attn = torch.matmul(probs, values)  # [kvh, B, g, d]
            out[:b] = attn.transpose(0, 1).reshape(b, num_heads * head_dim)

        if route.prefill_kernel:
            b = m.prefill_batch
            self.prefill_kernel(
                q, k_cache, v_cache, b.query_starts, b.query_lens, b.context_lens, b.block_tables, scale, out.view(num_tokens, num_heads, head_dim)
            )
            return out
        for p in m.prefills:
            sl = slice(p.query_start, p.query_start + p.query_len)
            keys = k_cache[:, p.block_table].flatten(1, 2).unsqueeze(0)  # [1, kvh, L, d]
            values = v_cache[:, p.block_table].flatten(1, 2).unsqueeze(0)
            queries = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, Tq, d]
            attn = F.scaled_dot_product_attention(
                queries,
                keys,
                values,
                attn_mask=p.causal_mask,
                is_causal=p.causal_mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[sl] = attn[0].transpose(0, 1).reshape(p.query_len, num_heads * head_dim)
        return out

    def _route(self, q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, m: TorchAttentionMetadata) -> _StepRoute:
        decode_kernel = bool(m.num_decodes) and self._use_decode_kernel(q, k_cache, m)
        return _StepRoute(
            backend=self,
            write_kernel=self.kv_writer is not None and k_cache.device.type == "cpu" and k.dtype == k_cache.dtype,
            decode_kernel=decode_kernel,
            prefill_kernel=m.prefill_batch is not None and self._use_prefill_kernel(q, k_cache),
            decodes_only=m.num_decodes == q.shape[0],
        )

    def _use_prefill_kernel(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (
            self.prefill_kernel is not None
            and q.device.type == "cpu"
            and q.dtype in self.prefill_dtypes
            and k_cache.dtype == q.dtype
            and q.shape[-1] in self.prefill_head_dims
        )

    def _use_decode_kernel(self, q: torch.Tensor, k_cache: torch.Tensor, m: TorchAttentionMetadata) -> bool:
        return (
            self.decode_kernel is not None
            and m.decode_context_lens is not None
            and q.device.type == "cpu"
            and k_cache.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16)
            and k_cache.dtype == q.dtype
        )
