"""The paged prefill attention kernel (bf16 and fp32) against a float32 reference, and the backend that calls it.

Fails when the kernel does not build on a machine with a compiler; skipped without one, with
TANDEM_DISABLE_CPU_KERNELS=1, or on a CPU without AVX2 or AVX-512, where the backend keeps torch's SDPA.
bf16 runs on AVX512-BF16's dot products where the CPU has them, else on K, V and q widened to float32;
on an AVX2 CPU (a Zen 3) every case runs the kernel's 8-lane build.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from services.engine.cpu_kernels import _reference_prefill, load_paged_prefill_attention_module
from tests.helpers.kernels import require_kernel

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.fixture(scope="module")
def module():
    return require_kernel(load_paged_prefill_attention_module(), "the paged prefill attention CPU kernel")


@pytest.fixture
def kernel(module, request):
    """The kernel, for the test's `dtype` parameter (bf16 where the test has none)."""
    dtype = request.node.callspec.params.get("dtype", torch.bfloat16) if hasattr(request.node, "callspec") else torch.bfloat16
    if str(dtype).removeprefix("torch.") not in module.dtypes:
        pytest.skip(f"this CPU lacks the instructions for {dtype}: prefill attention stays on torch's SDPA")
    return module.paged_prefill_attention


def make_case(*, chunks, kv_heads, group, head_dim, block_size=16, seed=0, qkv_view=False, dtype=torch.bfloat16):
    """chunks: (query_len, context_len) pairs. Each context gets shuffled blocks of one cache; blocks no
    context uses hold NaN, and so do the slots past each context's end, which the kernel must never read.
    qkv_view: q is a view into a fused [T, (H + 2 KVH) * D] projection, as the model passes it."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    blocks_per = [-(-ctx // block_size) for _, ctx in chunks]
    num_blocks = sum(blocks_per) + 5
    k_cache, v_cache = (torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype) for _ in range(2))
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(chunks), max(blocks_per) + 2, dtype=torch.long)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    nxt = 0
    for i, ((_, ctx), nb) in enumerate(zip(chunks, blocks_per)):
        tables[i, :nb] = perm[nxt : nxt + nb]
        used[perm[nxt : nxt + nb]] = True
        nxt += nb
        if ctx % block_size:
            k_cache[:, tables[i, nb - 1], ctx % block_size :] = float("nan")
            v_cache[:, tables[i, nb - 1], ctx % block_size :] = float("nan")
    k_cache[:, ~used] = float("nan")
    v_cache[:, ~used] = float("nan")
    total = sum(qlen for qlen, _ in chunks) + 3  # 3 rows (decodes, say) that belong to no chunk
    if qkv_view:
        fused = torch.randn(total, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        q = fused[:, : heads * head_dim].view(total, heads, head_dim)
        assert not q.is_contiguous()
    else:
        q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    starts, start = [], 3
    for qlen, _ in chunks:
        starts.append(start)
        start += qlen
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return q, k_cache, v_cache, as_long(starts), as_long([c[0] for c in chunks]), as_long([c[1] for c in chunks]), tables


def check(kernel, case, scale):
    q, k_cache, v_cache, starts, lens, ctxs, tables = case
    out = torch.full(q.shape, 7.0, dtype=q.dtype)
    kernel(q, k_cache, v_cache, starts, lens, ctxs, tables, scale, out)
    want = _reference_prefill(q, k_cache, v_cache, starts, lens, ctxs, tables, scale)
    assert (out[:3] == 7.0).all(), "rows outside every chunk were written"
    got = out[3:].float()
    assert torch.isfinite(got).all()
    if q.dtype == torch.float32:  # float32 throughout: only the order of the sums differs
        torch.testing.assert_close(got, want[3:], atol=1e-5, rtol=1e-5)
        return
    # Each softmax weight is rounded to bf16 (relative error <= 2**-9) before the P.V products, as torch's
    # flash kernel does, and the row sums add the rounded weights: the output stays a weighted mean of
    # the value rows, moved by at most ~2 * 2**-9 of their spread; then one bf16 rounding of the output.
    v_max = v_cache[torch.isfinite(v_cache)].abs().max().item()
    err = (got - want[3:]).abs()
    assert (err <= 2**-7 * v_max + 2**-8 * want[3:].abs()).all(), err.max()


CHUNKS = {
    "whole_prompts": [(256, 256), (64, 64), (16, 16)],
    "ragged": [(17, 17), (1, 1), (33, 33), (100, 100)],
    "cached_prefix": [(40, 300), (1, 77), (16, 48)],  # chunks after a prefix hit or an earlier chunk
    "long_chunk": [(300, 1100)],
}


@DTYPES
@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference(kernel, chunks, group, head_dim, dtype):
    case = make_case(chunks=chunks, kv_heads=2 if group == 4 else 3, group=group, head_dim=head_dim, dtype=dtype)
    check(kernel, case, scale=head_dim**-0.5)


@DTYPES
@pytest.mark.parametrize("block_size", [1, 8, 32, 5])
def test_block_sizes(kernel, block_size, dtype):
    """Key tiles of 16 straddle blocks of other sizes, including ones that do not divide 16."""
    case = make_case(chunks=CHUNKS["cached_prefix"], kv_heads=3, group=3, head_dim=64, block_size=block_size, dtype=dtype)
    check(kernel, case, 0.125)


@DTYPES
def test_query_view_of_fused_projection(kernel, dtype):
    check(kernel, make_case(chunks=CHUNKS["ragged"], kv_heads=3, group=3, head_dim=64, qkv_view=True, dtype=dtype), 0.125)


@DTYPES
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(kernel, threads, dtype):
    case = make_case(chunks=CHUNKS["ragged"] + CHUNKS["cached_prefix"], kv_heads=3, group=3, head_dim=64, seed=4, dtype=dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check(kernel, case, 0.125)
    finally:
        torch.set_num_threads(old)


def test_other_python_threads_run_during_a_call(kernel):
    """The worker's event loop shares the process with the engine thread, so a long prefill call must
    release the GIL. A thread spins in Python; with the interpreter's switch interval at 0.5 s, the
    only way it can count between the two reads of its counter here is the kernel letting go of the
    GIL (holding it, the count stays exactly put)."""
    q, k_cache, v_cache, starts, lens, ctxs, tables = make_case(chunks=[(1024, 1024)], kv_heads=3, group=3, head_dim=64, seed=5)
    out = torch.empty_like(q)
    count, stop = 0, threading.Event()

    def spin() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    spinner = threading.Thread(target=spin, daemon=True)
    try:
        spinner.start()
        time.sleep(0.01)
        before = count
        kernel(q, k_cache, v_cache, starts, lens, ctxs, tables, 0.125, out)
        counted = count - before
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
        spinner.join(timeout=5)
    assert counted > 1000, f"the spinning thread counted {counted} times during the call: the kernel held the GIL"


@DTYPES
def test_large_scores(kernel, dtype):
    """Scores that would overflow an unstabilised softmax: the running max must rescale correctly."""
    q, *rest = make_case(chunks=[(50, 90)], kv_heads=1, group=2, head_dim=64, seed=7, dtype=dtype)
    check(kernel, (q * 40, *rest), 1.0)


def test_bad_input_raises(kernel):
    q, k_cache, v_cache, starts, lens, ctxs, tables = make_case(chunks=[(20, 40), (5, 5)], kv_heads=3, group=3, head_dim=64)
    out = torch.zeros(q.shape, dtype=torch.bfloat16)
    bad_calls = {
        "float64": (q.double(), k_cache.double(), v_cache.double(), starts, lens, ctxs, tables, out.double()),
        "mixed dtypes": (q.float(), k_cache, v_cache, starts, lens, ctxs, tables, out.float()),
        "out in another dtype": (q, k_cache, v_cache, starts, lens, ctxs, tables, out.float()),
        "head_dim 80": (q[..., :40], k_cache[..., :40], v_cache[..., :40], starts, lens, ctxs, tables, out[..., :40]),
        "out shape": (q, k_cache, v_cache, starts, lens, ctxs, tables, out[1:]),
        "int32 tables": (q, k_cache, v_cache, starts, lens, ctxs, tables.int(), out),
        "chunk past q": (q, k_cache, v_cache, starts + 100, lens, ctxs, tables, out),
        "context shorter than chunk": (q, k_cache, v_cache, starts, lens, lens - 1, tables, out),
        "table shorter than context": (q, k_cache, v_cache, starts, lens, ctxs, tables[:, :1], out),
        "block id out of range": (q, k_cache, v_cache, starts, lens, ctxs, torch.full_like(tables, k_cache.shape[1]), out),
        "negative block id": (q, k_cache, v_cache, starts, lens, ctxs, torch.full_like(tables, -1), out),
        "heads not a multiple of kv heads": (q[:, :8], k_cache, v_cache, starts, lens, ctxs, tables, out[:, :8]),
        "one length too few": (q, k_cache, v_cache, starts, lens[:1], ctxs, tables, out),
    }
    for what, args in bad_calls.items():
        with pytest.raises(RuntimeError, match="paged_prefill_attention"):
            kernel(*args[:7], 0.125, args[7])
            pytest.fail(f"no error for {what}")


@DTYPES
def test_backend_prefill_uses_kernel_and_matches_sdpa(kernel, dtype):
    """A mixed step (decodes, a whole prompt, a chunk after a cached prefix) through the torch backend:
    the same output with the kernel as with SDPA, and the kernel is what runs."""
    from services.engine.attention.backend import SequenceSlice
    from services.engine.attention.torch_backend import TorchAttentionBackend

    gen = torch.Generator().manual_seed(3)
    kvh, heads, d, bs, nb = 3, 9, 64, 16, 80
    storage = torch.randn(2, kvh, nb, bs, d, generator=gen).to(dtype)
    # (query_len, context_len): two decodes, then two prefill chunks
    shapes = [(1, 30), (1, 17), (64, 64), (40, 200)]
    perm = torch.randperm(nb, generator=gen).tolist()
    slices, start, row = [], 0, 0
    for qlen, ctx in shapes:
        blocks = perm[start : start + -(-ctx // bs)]
        start += len(blocks)
        slices.append(SequenceSlice(row, qlen, ctx, blocks))
        row += qlen
    q = torch.randn(row, heads, d, generator=gen).to(dtype)
    k = torch.randn(row, kvh, d, generator=gen).to(dtype)
    v = torch.randn(row, kvh, d, generator=gen).to(dtype)

    fused = TorchAttentionBackend()
    assert fused.prefill_kernel is not None
    plain = TorchAttentionBackend()
    plain.prefill_kernel = None
    calls = []
    real = fused.prefill_kernel
    fused.prefill_kernel = lambda *a: calls.append(1) or real(*a)
    outs = []
    for backend in (fused, plain):
        cache = storage.clone()
        meta = backend.build_metadata(slices, row, bs)
        outs.append(backend.forward(q, k, v, cache[0], cache[1], meta, d**-0.5).float())
    assert calls == [1], "the backend did not run the prefill kernel"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)


def test_backend_runs_the_kernel_only_where_it_was_built(module):
    from services.engine.attention.torch_backend import TorchAttentionBackend

    backend = TorchAttentionBackend()
    cache = lambda dtype: torch.zeros(3, 2, 16, 64, dtype=dtype)  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        want = str(dtype).removeprefix("torch.") in module.dtypes
        assert backend._use_prefill_kernel(torch.zeros(4, 9, 64, dtype=dtype), cache(dtype)) == want
    assert not backend._use_prefill_kernel(torch.zeros(4, 9, 64, dtype=torch.float16), cache(torch.float16))
    assert not backend._use_prefill_kernel(torch.zeros(4, 9, 64), cache(torch.bfloat16)), "mixed dtypes keep SDPA"
    assert not backend._use_prefill_kernel(torch.zeros(4, 9, 80), torch.zeros(3, 2, 16, 80)), "head_dim 80 keeps SDPA"
