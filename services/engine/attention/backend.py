"""The attention backend interface: how a model layer reads and writes the paged KV cache.

The model computes q, k, v for a flat batch of tokens (every scheduled sequence's new tokens,
concatenated) and hands them to the backend together with the metadata the backend built for
this step. The backend writes the new k/v into the cache slots the scheduler assigned and returns
the attention output. Everything paged-KV-specific lives behind this interface, so a CUDA backend
(flashinfer's paged prefill/decode kernels) can replace the torch one without touching the model.

Batch order contract: decode sequences (one new token each) come first in the flat batch, then
prefill chunks. Backends may rely on it to run all decodes as one batched kernel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part of a step: its new tokens and where its KV lives."""

    query_start: int  # offset of its first new token in the flat batch
    query_len: int  # new tokens this step (1 for a decode)
    context_len: int  # tokens in its KV after this step (cached + new)
    block_table: list[int]  # KV block ids, in order, covering context_len tokens


class AttentionBackend(ABC):
    """Builds per-step metadata once, then serves every layer's attention for that step."""

    name: str

    @abstractmethod
    def build_metadata(self, slices: list[SequenceSlice], num_tokens: int, block_size: int) -> object:
        """Turn the step's sequence slices into whatever tensors this backend's kernels need."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # this layer's keys, layout chosen by the KV cache (see kv_cache.py)
        v_cache: torch.Tensor,
        metadata: object,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Write k/v into the cache, then attend each sequence's queries to its whole context."""


def select_backend(device: torch.device) -> AttentionBackend:
    """flashinfer where CUDA is present and the package imports; the torch backend everywhere else."""
    if device.type == "cuda":
        try:
            from .flashinfer_backend import FlashInferBackend

            return FlashInferBackend()
        except ImportError:
            pass
    from .torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
