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

import logging
import time

import torch
import torch.nn.functional as F

from ..attention.backend import AttentionBackend
from ..model_config import ModelConfig
from .layer_ops import FusedLayerOps, TorchLayerOps, select_layer_ops
from .rope import RotaryEmbedding

logger = logging.getLogger(__name__)


def small_batch_max_rows(dtype: torch.dtype, has_bf16_dot: bool) -> int:
    """Matmuls with at most this many rows go to the small-batch kernel until Linear.calibrate() has
    measured this machine (the default where it has not), from one Xeon's figures (2 threads,
    same run, summed over the model's five weight shapes): bf16 on the AVX512-BF16 dot-product path
    1.1 / 1.2 / 1.6 / 2.9 ms at M = 1 / 2 / 4 / 8 against torch's 2.1 / 2.1 / 2.2 / 2.2, so up to 4
    rows (1 row without that path, where the kernel widens W to float32 first); fp32: torch 2.4 /
    2.5 / 5.1 / 7.8 ms against the kernel's 2.7 / 4.5 / 7.9 / 12.1, so never (torch 2.13's fp32 GEMV
    splits across threads now; the kernel was 3-4x faster against torch 2.4's)."""
    if dtype == torch.bfloat16:
        return 4 if has_bf16_dot else 1
    return 0


def _best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


_NO_LIMIT = 1 << 62  # rows: no upper bound


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack and run weights of `dtype` here: its bf16 matmul needs AVX-512 (BW, VL, DQ)
    or AVX-NE-CONVERT, and `_reorder_linear_weight` raises without them (a Zen 3's AVX2, say), where bf16
    weights go to the panel kernel instead (or stay plain for F.linear without it)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear:
    """F.linear, except decode steps with few rows use the small-batch CPU kernel (it splits output rows
    over threads and streams W once at close to memory bandwidth), bf16 weights prepacked for oneDNN
    (prepack()) run through its packed matmul where oneDNN runs bf16, and fp32 weights, where the CPU has
    AVX-512 or AVX2, are packed into panels for csrc/panel_linear.cpp instead of for oneDNN (a 64-sequence
    fp32 decode step 11% faster on a Zen 4, prefill steps level; 10% and 7-8% on a Zen 3; the numbers are
    in that file). bf16 weights go to bf16 panels wherever the CPU has no AMX (whose tiles oneDNN
    uses). With AVX512-BF16's dot instruction they beat oneDNN's packed bf16 matmul at 1 to 512 rows
    (423 against 352 GF/s at 64 rows, 396 against 293 at 32, level at 2,048; SmolLM2-135M's shapes, 2
    cores of a Zen 4, `python -m benchmarks.linear_kernels`). Without it the panels widen bf16 to fp32,
    and still win: on AVX-512 without BF16 (an Ice Lake Xeon) oneDNN emulates bf16, 157 against 52 GF/s
    at 64 rows and 187 against 62 at 2,048; on AVX2 without AVX-NE-CONVERT oneDNN has no bf16 matmul,
    and F.linear's fallback there ran SmolLM2-135M's matmuls 8x slower at 64 rows.

    Prepacking: F.linear hands oneDNN the plain [N, K] weight on every call, and oneDNN reorders it
    into its blocked layout each time. Packed once, bf16 matmuls measured 1.5-2.4x faster at 5 to
    2,048 rows (30 distinct [3072, 576] weights, 2 threads, same run; equal at 8,192), and a decode
    step at 64 sequences went from 73 to 64 ms; fp32 1.4-1.6x at 4 to 64 rows, 1.1-1.2x at 512 to
    2,048, but slower at 1-2 rows (0.83x, 0.91x), which stay on torch's GEMV. The cost is a second
    copy of the weights."""

    PACKED_MIN_ROWS = {torch.float32: 3, torch.bfloat16: 1}
    # until calibrate() has timed the panels against torch's GEMV at 1-2 fp32 rows: the GEMV (MKL's was
    # faster than oneDNN there on a Xeon and a Zen 4), or the small-batch kernel
    PANEL_MIN_ROWS = {torch.float32: 3, torch.bfloat16: 1}
    # fp32 row counts calibrate_large_rows() tries torch's F.linear at, largest first (see there)
    LARGE_ROWS = (2048, 512)

    def __init__(self, small_batch_kernel, has_bf16_dot: bool = False, panel_module=None):
        self.kernel = small_batch_kernel
        self.max_rows = {dtype: small_batch_max_rows(dtype, has_bf16_dot) for dtype in (torch.float32, torch.bfloat16)}
        self.packed: dict[int, torch.Tensor] = {}  # id(plain weight) -> its oneDNN-packed copy
        self.panel_module = panel_module if panel_module is not None and panel_module.available else None
        self.panels: dict[int, torch.Tensor] = {}  # id(plain weight) -> its panels
        self.swiglu_panels: dict[int, torch.Tensor] = {}  # id([gate; up] weight) -> its panels for panel_swiglu
        self.panel_min_rows = dict(self.PANEL_MIN_ROWS)
        # matmuls of this many rows or more leave the panels for F.linear (calibrate_large_rows)
        self.panel_max_rows: dict[torch.dtype, int] = {}

    def prepack(self, w: torch.Tensor) -> None:
        """Pack `w`: fp32 and bf16 CPU weights into panels where the panel kernel runs, except bf16 ones
        on a CPU with AMX (oneDNN's tiles win there); else fp32/bf16 CPU weights for oneDNN's matmul
        (where torch has oneDNN); a no-op elsewhere. Without AMX, oneDNN's bf16 matmul is slower than
        the panels even where it runs: on AVX512-BF16 the panels' dot instruction beat it, and on
        AVX-512 without it (an Ice Lake) oneDNN emulates bf16, 2.2x slower than the widening panels."""
        if w.device.type != "cpu":
            return
        if self.panel_module is not None and (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and not self.panel_module.amx_bf16)):
            self.panels[id(w)] = self.panel_module.pack_panels(w)
        elif w.dtype in self.PACKED_MIN_ROWS and onednn_packs(w.dtype):
            self.packed[id(w)] = torch.ops.mkldnn._reorder_linear_weight(w, 64)

    def prepack_gate_up(self, w: torch.Tensor, fuse: bool) -> None:
        """Pack a bf16 SwiGLU MLP's [gate; up] weight for panel_swiglu, the matmul with silu-and-mul as
        its epilogue, where the panel kernel has it (AVX512-BF16 builds) and `fuse` (the layer ops
        compute silu as that epilogue does, csrc/silu_mul.h: the same bits); else as any weight
        (prepack). Its plain panels are then not kept: the fused matmul is its only panel matmul.

        Why: the separate silu_and_mul was a pass over the [rows, 2 x intermediate] product after the
        matmul wrote it, 3.3% of a bf16 prefill step (2 cores of a Zen 4, SmolLM2-135M); fused, a
        2,048-token step took 0.977-0.992x the time, decode steps level. fp32 gained nothing
        measurable and keeps the separate pass (csrc/panel_linear.cpp, docs/benchmarks.md 12-08)."""
        pm = self.panel_module
        if fuse and pm is not None and getattr(pm, "swiglu", False) and w.device.type == "cpu" and w.dtype == torch.bfloat16:
            self.swiglu_panels[id(w)] = pm.pack_swiglu_panels(w)
        else:
            self.prepack(w)

    def gate_up_silu(self, x: torch.Tensor, w: torch.Tensor, silu_and_mul) -> torch.Tensor:
        """silu(x Gᵀ) * (x Uᵀ) for w = [G; U]: one pass through the panels where prepack_gate_up packed w
        for it and the row count is one __call__ gives the panels, else the matmul, then `silu_and_mul`."""
        panels = self.swiglu_panels.get(id(w))
        if panels is not None and not self._to_small_batch_kernel(x) and self._panel_rows(x):
            return self.panel_module.panel_swiglu(x.contiguous(), panels, w.shape[0] // 2)
        return silu_and_mul(self(x, w))

    def _to_small_batch_kernel(self, x: torch.Tensor) -> bool:
        return self.kernel is not None and x.shape[0] <= self.max_rows.get(x.dtype, 0) and x.is_contiguous()

    def _panel_rows(self, x: torch.Tensor) -> bool:
        """Whether x's row count is one the panels take (calibrate_panels, calibrate_large_rows)."""
        return self.panel_min_rows[x.dtype] <= x.shape[0] < self.panel_max_rows.get(x.dtype, _NO_LIMIT)

    def calibrate(self, weights: list[torch.Tensor], max_m: int = 4, reps: int = 3) -> dict[int, tuple[float, float]]:
        """Time the small-batch kernel against torch's path (panels, packed oneDNN or GEMV) on the
        model's own weights at 1..max_m rows, and send to the kernel the row counts up to the first one
        where it is not at least 5% faster. Which is faster depends on the CPU, not only the dtype: fp32
        at one row took torch 2.4 ms against the kernel's 2.7 on a Xeon (MKL's GEMV), but 37.7 against
        15.3 ms per 30 layers on an AMD EPYC (where MKL does not take its fast path). First, where the
        weights have panels, the panels are timed against torch's GEMV at the row counts below
        PANEL_MIN_ROWS (calibrate_panels), and at large row counts against F.linear
        (calibrate_large_rows). `weights` should span more than the last-level cache, as a decode
        step's do. Returns {rows: (kernel s, torch s)}."""
        if not weights:
            return {}
        dtype = weights[0].dtype
        self.calibrate_panels(weights, reps)
        self.calibrate_large_rows(weights[:4], reps=2)  # one layer: ~0.4 s of a load on 2 cores
        if self.kernel is None:
            return {}
        timings: dict[int, tuple[float, float]] = {}
        self.max_rows[dtype] = 0  # torch's path while timing it
        chosen = 0
        for m in range(1, max_m + 1):
            xs = {w.shape[1]: torch.randn(m, w.shape[1]).to(dtype) for w in weights}
            kernel_s = _best_of(lambda: [self.kernel(xs[w.shape[1]], w, None) for w in weights], reps)
            torch_s = _best_of(lambda: [self(xs[w.shape[1]], w) for w in weights], reps)
            timings[m] = (kernel_s, torch_s)
            if kernel_s > 0.95 * torch_s:  # a near tie goes to torch, so that it does not flip between loads
                break
            chosen = m
        self.max_rows[dtype] = chosen
        return timings

    def calibrate_panels(self, weights: list[torch.Tensor], reps: int = 3) -> dict[int, tuple[float, float]]:
        """Send fewer rows to the panels, down to the fewest where they beat torch's GEMV on `weights`:
        on a Zen 3, 1 fp32 row over SmolLM2-135M's 30 layers took the panels 20.9 ms (the weights' bytes
        at memory speed) against the GEMV's 46.1, and 2 rows 20.3 against 71.2. Returns {rows: (panel
        s, GEMV s)}, empty where the weights have no panels."""
        if not weights or any(id(w) not in self.panels for w in weights):
            return {}
        dtype = weights[0].dtype
        timings: dict[int, tuple[float, float]] = {}
        for m in range(self.PANEL_MIN_ROWS[dtype] - 1, 0, -1):
            panel_s, torch_s = timings[m] = self._time_panels_and_f_linear(weights, m, reps)
            if panel_s > 0.95 * torch_s:  # a near tie goes to torch, so that it does not flip between loads
                break
            self.panel_min_rows[dtype] = m
        return timings

    def calibrate_large_rows(self, weights: list[torch.Tensor], reps: int = 2) -> dict[int, tuple[float, float]]:
        """Send fp32 matmuls of many rows (a prefill step's) to F.linear from the fewest of LARGE_ROWS
        where it beats the panels by 5% on `weights`, trying the largest first. On a Zen 4 the panels
        matched oneDNN at 2,048 rows; on an Ice Lake Xeon the one-panel tiles ran SmolLM2-135M's shapes
        at 222 GF/s against MKL's 268 (2 cores), and a 16 x 256-token fp32 prefill took 6.4 s against
        5.0 (median of 6, alternating). The two-panel tiles since brought the panels level there (296
        against 301 at 2,048 rows), so the calibration now guards CPUs where MKL is ahead rather than
        deciding this one. At a decode step's few dozen rows the panels win on both. Compute-bound, so
        a layer or two of weights measure it; on an AMD EPYC, where MKL leaves its fast path, it keeps
        the panels.
        Two row counts only: a calibration is part of every load.
        Returns {rows: (panel s, F.linear s)}, empty where the weights are not fp32 panels."""
        if not weights or weights[0].dtype != torch.float32 or any(id(w) not in self.panels for w in weights):
            return {}
        timings: dict[int, tuple[float, float]] = {}
        for m in self.LARGE_ROWS:
            panel_s, torch_s = timings[m] = self._time_panels_and_f_linear(weights, m, reps)
            if torch_s > 0.95 * panel_s:  # a near tie keeps the panels
                break
            self.panel_max_rows[torch.float32] = m
        return timings

    def _time_panels_and_f_linear(self, weights: list[torch.Tensor], rows: int, reps: int) -> tuple[float, float]:
        """Best-of-`reps` seconds for `rows` rows of x against every weight in `weights`: (the panels, F.linear)."""
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(weights[0].dtype) for w in weights}
        panel_s = _best_of(lambda: [self.panel_module.panel_linear(xs[w.shape[1]], self.panels[id(w)], w.shape[0]) for w in weights], reps)
        torch_s = _best_of(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], reps)
        return panel_s, torch_s

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._to_small_batch_kernel(x):
            return self.kernel(x, w, b)
        panels = self.panels.get(id(w))
        if panels is not None and self._panel_rows(x):
            return self.panel_module.panel_linear(x.contiguous(), panels, w.shape[0], b)
        packed = self.packed.get(id(w))
        if packed is not None and x.shape[0] >= self.PACKED_MIN_ROWS[x.dtype]:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, w, b)


# The MLP runs over a large step's tokens in row chunks whose [rows, 2 x intermediate] activation stays
# under this size. Above glibc's mmap threshold (at most 32 MiB) every such buffer is a fresh mmap that
# the kernel faults in and zeroes page by page, each layer (and in the server's engine thread, whose malloc
# arena cannot hold a buffer that large, no threshold setting avoids it); below it, malloc reuses heap
# memory. One 8,192-row fp32 gate/up matmul of SmolLM2-135M (a 100 MB output) ran at 135 GF/s, and at 194
# when malloc kept it in the heap. An 8,192-token fp32 prefill step: 10.61 -> 10.15 s and 10.98 -> 10.25 s
# median in 2,048-row chunks (alternating in one process, 2 cores of a Zen 4); bf16 (4,096-row chunks)
# within noise, 4.98 -> 5.15 and 4.99 -> 5.04 s median, 4.82 -> 4.86 and 4.93 -> 4.90 s best. It also
# bounds the MLP's peak memory: an 8,192-token step of an 8B model would otherwise hold a ~0.9 GB fp32
# gate/up output.
# Smaller chunks than that budget first had (24 MB) also keep the gate/up output in cache for the
# silu-and-mul and the down matmul that read it at once, where a 25 MB one went to memory (the panel
# kernel writes outputs of 16 MB or more with non-temporal stores) and was read back. A 2,048-token fp32
# prefill step of SmolLM2-135M on an Ice Lake Xeon (2 cores), two engines alternating step by step, 8
# steps each, against one 2,048-row chunk: 512-row chunks 0.884 and 0.935 (median pair ratio; 3,465 ->
# 3,098 and 3,157 -> 2,830 ms median), 1,024 rows 0.953, 256 rows 1.073; bf16 in 1,024-row chunks level
# (1.013). Not yet measured on an AMD CPU or with a larger model.
MLP_CHUNK_BYTES = 6 << 20
# but never fewer rows than this: the floor binds only for wide MLPs (an 8B model's fp32 [256, 28,672]
# output is 29 MB, under glibc's mmap threshold), and 256 rows measured slower than one 2,048-row
# chunk above
MLP_MIN_CHUNK_ROWS = 256


def mlp_chunk_rows(intermediate_x2: int, element_size: int) -> int:
    """Rows per MLP chunk: as many as keep [rows, intermediate_x2] under MLP_CHUNK_BYTES, in multiples
    of 64 and at least MLP_MIN_CHUNK_ROWS."""
    return max(MLP_MIN_CHUNK_ROWS, MLP_CHUNK_BYTES // (intermediate_x2 * element_size) // 64 * 64)


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
        self.qkv_heads = [cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads]  # q, k, v heads of a qkv row
        self.scale = cfg.head_dim**-0.5
        self.mlp_rows = mlp_chunk_rows(self.gate_up.shape[0], self.gate_up.element_size())

    def forward(self, hidden, residual, rope_input, ops: TorchLayerOps, k_cache, v_cache, meta, backend: AttentionBackend):
        """One layer: returns (its output, the residual stream). The residual add of this layer's
        output happens in the next norm (add_rms_norm), so norm and add are one pass; `residual` is
        None for the first layer, whose input is the residual stream."""
        cfg = self.cfg
        num_tokens = hidden.shape[0]
        if residual is None:
            residual = hidden
            h = ops.rms_norm(hidden, self.input_norm)
        else:
            h, residual = ops.add_rms_norm(hidden, residual, self.input_norm)
        # [T, q + k + v heads, head_dim]; q, k and v are views of it (split_with_sizes: one C call, where
        # Tensor.split's Python wrapper and three reshapes cost ~10 us a layer)
        qkv = self.linear(h, self.qkv, self.qkv_bias).view(num_tokens, -1, cfg.head_dim)
        if self.q_norm is None and ops.rotates_in_place:
            # q's and k's heads lead each row, side by side: one rotary pass over both
            ops.rope_leading_heads_(qkv, cfg.num_heads + cfg.num_kv_heads, rope_input)
            q, k, v = qkv.split_with_sizes(self.qkv_heads, 1)
        else:
            q, k, v = qkv.split_with_sizes(self.qkv_heads, 1)
            if self.q_norm is not None:  # per-head norms (Qwen3): rows of head_dim
                q = ops.rms_norm(q.reshape(-1, cfg.head_dim), self.q_norm).view(num_tokens, cfg.num_heads, cfg.head_dim)
                k = ops.rms_norm(k.reshape(-1, cfg.head_dim), self.k_norm).view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            q, k = ops.rope(q, k, rope_input)
        attn = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        hidden = self.linear(attn, self.o_proj)

        h, residual = ops.add_rms_norm(hidden, residual, self.post_attn_norm)
        return self.mlp(h, ops), residual

    def mlp(self, h: torch.Tensor, ops: TorchLayerOps) -> torch.Tensor:
        """down(silu(gate) * up), in chunks of self.mlp_rows rows (see MLP_CHUNK_BYTES)."""

        def one_pass(part: torch.Tensor) -> torch.Tensor:
            return self.linear(self.linear.gate_up_silu(part, self.gate_up, ops.silu_and_mul), self.down)

        rows = h.shape[0]
        if rows <= self.mlp_rows:
            return one_pass(h)
        out = h.new_empty(rows, self.down.shape[0])
        for start in range(0, rows, self.mlp_rows):
            out[start : start + self.mlp_rows] = one_pass(h[start : start + self.mlp_rows])
        return out


class LlamaForCausalLM:
    """Inference-only model over a paged KV cache. Holds no per-request state."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype):
        self.cfg = cfg
        self.dtype = dtype
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        kernels = panels = None
        if dtype in (torch.bfloat16, torch.float32) and self.embed.device.type == "cpu":
            from ..cpu_kernels import load_panel_linear_module, load_small_batch_linear_module

            kernels = load_small_batch_linear_module()
            panels = load_panel_linear_module()
        self.linear = Linear(kernels.small_batch_linear if kernels else None, kernels.has_bf16_dot if kernels else False, panels)
        self.layers = [
            DecoderLayer(cfg, {k.split(".", 3)[3]: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}, self.linear)
            for i in range(cfg.num_layers)
        ]
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, dtype)
        self.ops = select_layer_ops(self.rope, cfg.rms_norm_eps, dtype, self.embed.device)
        fuse_swiglu = isinstance(self.ops, FusedLayerOps)  # the fused epilogue's silu is the fused op's
        for layer in self.layers:
            for w in (layer.qkv, layer.o_proj, layer.down):
                self.linear.prepack(w)
            self.linear.prepack_gate_up(layer.gate_up, fuse_swiglu)
        self.linear.prepack(self.lm_head)
        if kernels is not None or panels is not None:
            # whole layers' weights until ~96 MB: more than a CPU's last-level cache, as a decode step
            # streams them, and no more, so that a large model's load pays a few passes over one layer
            sample: list[torch.Tensor] = []
            for layer in self.layers:  # (gate/up weights packed for the fused matmul have no plain panels to time)
                sample += [w for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down) if id(w) not in self.linear.swiglu_panels]
                if sum(w.numel() * w.element_size() for w in sample) >= 96 << 20:
                    break
            timings = self.linear.calibrate(sample)
            logger.info(
                "small-batch matmuls: %s rows to the kernel (%s); panels from %s rows, F.linear from %s",
                self.linear.max_rows[dtype],
                ", ".join(f"{m} rows: kernel {k * 1e3:.2f} ms / torch {t * 1e3:.2f} ms" for m, (k, t) in timings.items()),
                self.linear.panel_min_rows.get(dtype, "-"),
                self.linear.panel_max_rows.get(dtype, "-"),
            )

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
        rope_input = self.ops.prepare(positions)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = layer.forward(hidden, residual, rope_input, self.ops, k_cache, v_cache, meta, backend)
        hidden, _ = self.ops.add_rms_norm(hidden[logits_indices], residual[logits_indices], self.norm)
        return self.linear(hidden, self.lm_head)
