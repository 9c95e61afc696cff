"""The decoder layer's elementwise steps behind one small interface: plain torch, or fused CPU kernels.

    rms_norm(x, w)                  first layer's input norm
    add_rms_norm(x, residual, w)    residual + x, then its norm: (normed, new residual)
    rope(q, k, positions)           rotary embedding of q and k (positions from prepare())
    rope_leading_heads_(qkv, n, p)  the same in place over a fused qkv row's leading q and k heads
                                    (fused ops only: rotates_in_place)
    silu_and_mul(gate_up)           SwiGLU's silu(gate) * up

The layer carries the residual stream separately (as vLLM does) so each residual add happens inside
the next norm's pass. TorchLayerOps is the reference, step for step transformers' arithmetic;
FusedLayerOps runs csrc/fused_elementwise.cpp, which rounds at the same points (the engine's token
for token equality with transformers holds on either), ~30 torch ops per layer becoming 5 calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import RotaryEmbedding


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class TorchLayerOps:
    name = "torch"
    rotates_in_place = False  # whether rope_leading_heads_ exists: rope() returns new tensors here

    def __init__(self, rope: RotaryEmbedding, eps: float):
        self.rope_tables = rope
        self.eps = eps

    def prepare(self, positions: torch.Tensor):
        return self.rope_tables.lookup(positions)

    def rms_norm(self, x, weight):
        return torch_rms_norm(x, weight, self.eps)

    def add_rms_norm(self, x, residual, weight):
        residual = residual + x
        return torch_rms_norm(residual, weight, self.eps), residual

    def rope(self, q, k, prepared):
        cos, sin = prepared
        return self.rope_tables.apply(q, cos, sin), self.rope_tables.apply(k, cos, sin)

    def silu_and_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedLayerOps(TorchLayerOps):
    """The same steps through the compiled kernels (2-D rows with stride 1 in the last dim)."""

    name = "fused"
    rotates_in_place = True

    def __init__(self, rope: RotaryEmbedding, eps: float, kernels):
        super().__init__(rope, eps)
        self.k = kernels

    def prepare(self, positions):
        return positions

    def rms_norm(self, x, weight):
        return self.k.rms_norm(x, weight, self.eps)

    def add_rms_norm(self, x, residual, weight):
        return self.k.add_rms_norm_(x, residual, weight, self.eps), residual  # residual updated in place

    def rope(self, q, k, positions):
        self.k.rope_(q, q.shape[1], positions, self.rope_tables.cos, self.rope_tables.sin)
        self.k.rope_(k, k.shape[1], positions, self.rope_tables.cos, self.rope_tables.sin)
        return q, k

    def rope_leading_heads_(self, x, num_heads, positions):
        """Rotate x[:, :num_heads] of a [T, heads, head_dim] tensor in place: q's and k's heads together
        where they lead each fused qkv row (one call a layer instead of two)."""
        self.k.rope_(x, num_heads, positions, self.rope_tables.cos, self.rope_tables.sin)

    def silu_and_mul(self, gate_up):
        return self.k.silu_and_mul(gate_up)


def select_layer_ops(rope: RotaryEmbedding, eps: float, dtype: torch.dtype, device: torch.device) -> TorchLayerOps:
    """Fused kernels on the CPU for float32/bfloat16 where they build; torch elsewhere."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from ..cpu_kernels import load_fused_elementwise

        kernels = load_fused_elementwise()
        if kernels is not None:
            return FusedLayerOps(rope, eps, kernels)
    return TorchLayerOps(rope, eps)
