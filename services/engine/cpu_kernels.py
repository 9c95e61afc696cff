"""CPU C++ kernels compiled at run time, with a None fallback when they cannot be built.

`load_paged_decode_attention()` compiles csrc/paged_decode_attention.cpp once per process (through
`torch.utils.cpp_extension.load`, which needs a C++ compiler and ninja) and returns its
`paged_decode_attention(q, k_cache, v_cache, block_table, context_lens, scale)` function, or None —
with one logged warning saying why — when it cannot; callers then keep their plain-torch path.

Builds are cached under ``$TANDEM_CACHE_DIR/kernels/<hash>`` (TANDEM_CACHE_DIR defaults to
~/.cache/tandem). The hash covers the source, the compiler flags, torch's version, the Python ABI and
the CPU's feature flags: the code is built with -march=native, so a cache copied to a machine with a
different CPU gets its own build instead of an illegal instruction. Concurrent processes serialise on
an flock next to the build directory; it dies with its holder, unlike torch's own `lock` file, which a
process killed mid-build leaves behind and which makes every later `load` wait forever (a stale one is
removed while the flock is held).

``TANDEM_DISABLE_CPU_KERNELS=1`` turns every kernel off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
# -fopenmp: at::parallel_for is OpenMP code inlined from torch's headers; without it the kernel runs on
# one thread. The OpenMP runtime itself is the libgomp torch already loaded (nothing extra is linked).
# -mprefer-vector-width=512: gcc vectorises for AVX-512 CPUs with 256-bit vectors unless told; the fused
# elementwise kernels' loops ran 1.2-1.4x faster at full width (silu_and_mul 70 -> 50 us, add_rms_norm
# 19 -> 15 us at 64 rows, same results bit for bit). A preference only: no effect without AVX-512.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp"]


def kernels_disabled() -> bool:
    return os.environ.get("TANDEM_DISABLE_CPU_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


def kernel_cache_root() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join("~", ".cache", "tandem")
    return Path(root).expanduser() / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (first 'flags' line of /proc/cpuinfo); the machine name where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / arm
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def build_hash(source: Path, cflags: list[str] = _CFLAGS) -> str:
    h = hashlib.sha256()
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    for part in (
        source.read_bytes(),
        headers,
        " ".join(cflags).encode(),
        torch.__version__.encode(),
        sys.implementation.cache_tag.encode(),  # python ABI, e.g. cpython-311
        platform.machine().encode(),
        _cpu_flags().encode(),
        os.environ.get("CXX", "").encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's own file baton
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _compile(name: str, source: Path):
    """Build (or reuse) the extension for this source/torch/CPU and import it."""
    from torch.utils import cpp_extension

    build_dir = kernel_cache_root() / build_hash(source)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir.parent / f"{build_dir.name}.lock"):
        # every Tandem process builds under the flock above, so a torch baton found here is stale
        # (left by a process killed mid-build) and would make load() spin forever
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "lock").unlink()
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=list(_CFLAGS),
            build_directory=str(build_dir),
            verbose=False,
        )


def _reference_decode(q, k_cache, v_cache, block_table, context_lens, scale):
    """Plain torch decode attention (float32), for the post-build self-check."""
    kvh, _, bs, d = k_cache.shape
    outs = []
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        blocks = block_table[b, : -(-n // bs)]
        keys = k_cache[:, blocks].reshape(kvh, -1, d)[:, :n].float()
        values = v_cache[:, blocks].reshape(kvh, -1, d)[:, :n].float()
        group = q.shape[1] // kvh
        keys = keys.repeat_interleave(group, 0)
        values = values.repeat_interleave(group, 0)
        probs = torch.softmax(torch.einsum("hd,hld->hl", q[b].float(), keys) * scale, dim=-1)
        outs.append(torch.einsum("hl,hld->hd", probs, values))
    return torch.stack(outs)


def _self_check(fn: Callable) -> None:
    """Run the freshly loaded kernel on a small ragged GQA batch (on several threads) and compare."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(2, 9, 4, 8, generator=gen)
    v_cache = torch.randn(2, 9, 4, 8, generator=gen)
    q = torch.randn(3, 4, 8, generator=gen)
    table = torch.tensor([[3, 1, 7], [0, 8, 0], [5, 2, 6]])
    lens = torch.tensor([9, 5, 12])
    got = fn(q, k_cache, v_cache, table, lens, 0.35)
    want = _reference_decode(q, k_cache, v_cache, table, lens, 0.35)
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"self-check mismatch (max abs diff {(got - want).abs().max().item():.3g})")
    # bf16 at a served model's head_dim and block size: the AMX-tile and register paths where the CPU has them
    k_cache, v_cache = (torch.randn(2, 6, 16, 64, generator=gen).bfloat16() for _ in range(2))
    q = torch.randn(3, 6, 64, generator=gen).bfloat16()
    table = torch.tensor([[4, 0, 2], [5, 5, 5], [1, 3, 0]])
    lens = torch.tensor([40, 16, 3])
    got = fn(q, k_cache, v_cache, table, lens, 0.125).float()
    want = _reference_decode(q, k_cache, v_cache, table, lens, 0.125)
    if not torch.allclose(got, want, atol=1e-2, rtol=1e-2):
        raise RuntimeError(f"bf16 self-check mismatch (max abs diff {(got - want).abs().max().item():.3g})")


def _load(name: str, source: str, symbol: str | None, self_check: Callable, fallback: str):
    """Compile (or reuse) `source`, self-check `symbol` (None: the whole module), and return it; None
    with one warning on any failure."""
    if kernels_disabled():
        logger.info("CPU kernels disabled by TANDEM_DISABLE_CPU_KERNELS; using %s", fallback)
        return None
    try:
        module = _compile(name, _CSRC / source)
        fn = module if symbol is None else getattr(module, symbol)
        self_check(fn)
        return fn
    except Exception as e:  # no compiler, no ninja, compile error, unwritable cache, failed self-check, ...
        reason = " ".join(str(e).split())
        if len(reason) > 600:
            reason = reason[:600] + " ..."
        logger.warning("%s CPU kernel unavailable, using %s (%s: %s)", symbol or name, fallback, type(e).__name__, reason)
        return None


@functools.cache
def load_paged_decode_attention_module():
    """The compiled paged decode attention module (`paged_decode_attention`, and `amx_available`: whether
    its bf16 scores run on AMX tiles here), or None (logged once)."""
    return _load(
        "tandem_paged_decode_attention",
        "paged_decode_attention.cpp",
        None,
        lambda m: _self_check(m.paged_decode_attention),
        "the torch fallback for decode attention",
    )


def load_paged_decode_attention() -> Callable | None:
    """The compiled paged decode attention function, or None (logged once) when unavailable."""
    module = load_paged_decode_attention_module()
    return None if module is None else module.paged_decode_attention


def _self_check_linear(fn: Callable) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=gen), torch.randn(70, 40, generator=gen), torch.randn(70, generator=gen)
    if not torch.allclose(fn(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4):
        raise RuntimeError("self-check mismatch against torch.nn.functional.linear")


@functools.cache
def load_small_batch_linear_module():
    """The compiled small-M linear module (`small_batch_linear`, and `has_bf16_dot`: whether bf16 runs on
    the AVX512-BF16 dot-product path), or None (logged once)."""
    return _load(
        "tandem_small_batch_linear",
        "small_batch_linear.cpp",
        None,
        lambda m: _self_check_linear(m.small_batch_linear),
        "the torch fallback for small-batch matmuls",
    )


def load_small_batch_linear() -> Callable | None:
    """The compiled small-M linear (x·Wᵀ + bias for decode steps with few rows), or None (logged once)."""
    module = load_small_batch_linear_module()
    return None if module is None else module.small_batch_linear


def _self_check_panels(module) -> None:
    """Row counts across a register tile and a row block, a weight whose rows are not whole panels, bias."""
    if not module.available:
        return  # built without AVX2 or AVX-512: callers keep oneDNN and never call it
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        w, b = torch.randn(70, 40, generator=gen).to(dtype), torch.randn(70, generator=gen).to(dtype)
        panels = module.pack_panels(w)
        for rows in (1, 13, 200):
            x = torch.randn(rows, 40, generator=gen).to(dtype)
            for bias in (None, b):
                want = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
                if not torch.allclose(module.panel_linear(x, panels, 70, bias).float(), want, atol=tol, rtol=tol):
                    raise RuntimeError(f"self-check mismatch against torch.nn.functional.linear ({rows} rows, {dtype})")
    if module.swiglu:  # the fused bf16 gate/up matmul: silu(x Gᵀ) * (x Uᵀ), against torch in float32
        w = torch.randn(2 * 35, 40, generator=gen).bfloat16()
        panels = module.pack_swiglu_panels(w)
        for rows in (1, 13, 200):
            x = torch.randn(rows, 40, generator=gen).bfloat16()
            gate, up = torch.nn.functional.linear(x.float(), w.float()).chunk(2, dim=-1)
            if not torch.allclose(module.panel_swiglu(x, panels, 35).float(), torch.nn.functional.silu(gate) * up, atol=5e-2, rtol=5e-2):
                raise RuntimeError(f"self-check mismatch of panel_swiglu against torch ({rows} rows)")


@functools.cache
def load_panel_linear_module():
    """The compiled fp32/bf16 panel matmul (`pack_panels`, `panel_linear`; `panel_width`; `available`: built
    with AVX2 or AVX-512; `pack_swiglu_panels`, `panel_swiglu` where `swiglu`: the bf16 gate/up matmul with
    silu-and-mul fused, built with AVX512-BF16), or None (logged once)."""
    return _load("tandem_panel_linear", "panel_linear.cpp", None, _self_check_panels, "oneDNN's fp32 matmul")


def _self_check_fused(kernels) -> None:
    """The fused layer steps against the torch formulas they replace, float32 and bfloat16."""
    from .model_config import RopeConfig
    from .models.layer_ops import TorchLayerOps
    from .models.rope import RotaryEmbedding

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        rope = RotaryEmbedding(RopeConfig(theta=10000.0), 16, 64, dtype)
        ref = TorchLayerOps(rope, 1e-5)
        x, residual = torch.randn(5, 40, generator=gen).to(dtype), torch.randn(5, 40, generator=gen).to(dtype)
        w = torch.randn(40, generator=gen).to(dtype)
        want_norm, want_residual = ref.add_rms_norm(x, residual, w)
        got_residual = residual.clone()
        got_norm = kernels.add_rms_norm_(x, got_residual, w, 1e-5)
        q = torch.randn(5, 3, 16, generator=gen).to(dtype)
        pos = torch.tensor([0, 7, 3, 63, 1])
        want_q, _ = ref.rope(q, q, ref.prepare(pos))
        got_q = q.clone()
        kernels.rope_(got_q, 3, pos, rope.cos, rope.sin)
        gate_up = torch.randn(5, 48, generator=gen).to(dtype) * 4
        pairs = {"add_rms_norm_": (got_norm, want_norm), "residual": (got_residual, want_residual),
                 "rms_norm": (kernels.rms_norm(x, w, 1e-5), ref.rms_norm(x, w)), "rope_": (got_q, want_q),
                 "silu_and_mul": (kernels.silu_and_mul(gate_up), ref.silu_and_mul(gate_up))}  # fmt: skip
        for step, (got, want) in pairs.items():
            if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
                raise RuntimeError(f"self-check mismatch in {step} ({dtype}): max abs diff {(got.float() - want.float()).abs().max().item():.3g}")


@functools.cache
def load_fused_elementwise():
    """The compiled fused layer steps (add_rms_norm_, rms_norm, rope_, silu_and_mul), or None (logged once)."""
    return _load("tandem_fused_elementwise", "fused_elementwise.cpp", None, _self_check_fused, "torch for the layer's elementwise steps")


def _self_check_argmax(fn: Callable) -> None:
    """Rows with ties, a NaN, -inf and a tail past the last full vector, against torch.max(dim).indices."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(5, 77, generator=gen).to(dtype)
        logits[1, 20] = logits[1, 60] = logits[1].max() + 1  # a tie: the first wins
        logits[2, 33] = float("nan")
        logits[3] = float("-inf")
        logits[4, 76] = 100  # in the tail
        if not torch.equal(fn(logits), logits.max(dim=-1).indices):
            raise RuntimeError(f"self-check mismatch against torch.max(dim=-1).indices ({dtype})")


@functools.cache
def load_greedy_argmax() -> Callable | None:
    """The compiled greedy argmax (`argmax_rows`: the first index of each row's maximum), or None (logged once)."""
    return _load("tandem_greedy_argmax", "greedy_argmax.cpp", "argmax_rows", _self_check_argmax, "torch.max for greedy rows")


def _reference_prefill(q, k_cache, v_cache, query_starts, query_lens, context_lens, block_tables, scale):
    """Plain torch causal attention of each chunk over its paged context (float32), for the self-check."""
    kvh, _, bs, d = k_cache.shape
    group = q.shape[1] // kvh
    out = torch.zeros(q.shape, dtype=torch.float32)
    for start, qlen, ctx, table in zip(query_starts.tolist(), query_lens.tolist(), context_lens.tolist(), block_tables):
        blocks = table[: -(-ctx // bs)]
        keys = k_cache[:, blocks].reshape(kvh, -1, d)[:, :ctx].float().repeat_interleave(group, 0)
        values = v_cache[:, blocks].reshape(kvh, -1, d)[:, :ctx].float().repeat_interleave(group, 0)
        queries = q[start : start + qlen].float().transpose(0, 1)  # [H, Tq, d]
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - qlen, ctx)[:, None]
        scores = (queries @ keys.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        out[start : start + qlen] = (torch.softmax(scores, -1) @ values).transpose(0, 1)
    return out


def _self_check_prefill(module) -> None:
    """Chunks with and without a cached prefix, a context that is not a whole tile, GQA, head_dim 64, in
    each dtype the build runs (none without AVX2 or AVX-512: callers keep SDPA and never call it)."""
    for name in module.dtypes:
        dtype = getattr(torch, name)
        gen = torch.Generator().manual_seed(0)
        k_cache, v_cache = (torch.randn(2, 12, 16, 64, generator=gen).to(dtype) for _ in range(2))
        q = torch.randn(45, 6, 64, generator=gen).to(dtype)
        starts, lens, ctxs = torch.tensor([0, 20, 21]), torch.tensor([20, 1, 24]), torch.tensor([20, 37, 60])
        tables = torch.tensor([[3, 7, 0, 0], [1, 2, 4, 0], [5, 6, 8, 9]])
        out = torch.zeros_like(q)
        module.paged_prefill_attention(q, k_cache, v_cache, starts, lens, ctxs, tables, 0.125, out)
        want = _reference_prefill(q, k_cache, v_cache, starts, lens, ctxs, tables, 0.125)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        if not torch.allclose(out.float(), want, atol=tol, rtol=tol):
            raise RuntimeError(f"self-check mismatch, {name} (max abs diff {(out.float() - want).abs().max().item():.3g})")


@functools.cache
def load_paged_prefill_attention_module():
    """The compiled paged prefill attention module (`paged_prefill_attention`; `dtypes`: the torch dtype
    names it was built for, bfloat16 and float32 with AVX-512 or AVX2; `available`: any of them;
    `head_dims`), or None (logged once)."""
    return _load(
        "tandem_paged_prefill_attention",
        "paged_prefill_attention.cpp",
        None,
        _self_check_prefill,
        "torch's SDPA for prefill attention",
    )
