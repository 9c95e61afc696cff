"""The fused CPU paged decode attention kernel against a plain torch reference.

Fails when the kernel does not build on a machine with a compiler; skipped without one, or with TANDEM_DISABLE_CPU_KERNELS=1.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

import pytest
import torch

from services.engine import cpu_kernels
from services.engine.cpu_kernels import load_paged_decode_attention
from tests.helpers.kernels import require_kernel


@pytest.fixture(scope="module")
def kernel():
    return require_kernel(load_paged_decode_attention(), "the paged decode attention CPU kernel")


def reference(q, k_cache, v_cache, block_table, context_lens, scale):
    """Gather each sequence's blocks, repeat kv heads over their query group, softmax, matmul (float32)."""
    kvh, _, bs, d = k_cache.shape
    group = q.shape[1] // kvh
    outs = []
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        blocks = block_table[b, : -(-n // bs)]
        keys = k_cache[:, blocks].reshape(kvh, -1, d)[:, :n].float().repeat_interleave(group, dim=0)  # [H, n, d]
        values = v_cache[:, blocks].reshape(kvh, -1, d)[:, :n].float().repeat_interleave(group, dim=0)
        scores = torch.matmul(q[b].float().unsqueeze(1), keys.transpose(1, 2)).squeeze(1) * scale  # [H, n]
        outs.append(torch.matmul(torch.softmax(scores, dim=-1).unsqueeze(1), values).squeeze(1))
    return torch.stack(outs)


def make_case(*, lens, kv_heads, group, head_dim, block_size=16, dtype=torch.float32, num_layers=3, seed=0, head_strided=False):
    """Caches laid out like kv_cache.py (views `storage[layer, 0]` of one [L, 2, KVH, NB, BS, D] storage), a
    shuffled block table padded with entries beyond each context, and NaN/inf wherever no context reaches.

    head_strided: views of a [2, KVH, L, NB, BS, D] storage instead, so the kv-head stride is not NB*BS*D
    (the kernel must use the real strides, not assume a contiguous layer)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks_per_seq) + 2  # wider than any context: trailing entries must be ignored
    num_blocks = sum(blocks_per_seq) + 7
    storage = torch.randn(num_layers, 2, kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    if head_strided:
        storage = storage.permute(1, 2, 0, 3, 4, 5).contiguous().permute(2, 0, 1, 3, 4, 5)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.empty(batch, max_blocks, dtype=torch.long)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    nxt = 0
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = perm[nxt : nxt + nb]
        used[perm[nxt : nxt + nb]] = True
        nxt += nb
        # padding entries point at blocks no context uses (garbage) or at block ids valid for others
        table[b, nb:] = perm[nxt:][torch.randint(0, num_blocks - nxt, (max_blocks - nb,), generator=gen)]
    layer = 1
    k_cache, v_cache = storage[layer, 0], storage[layer, 1]
    # garbage in unused blocks and in the unused tail of each sequence's last block
    k_cache[:, ~used] = float("nan")
    v_cache[:, ~used] = float("inf")
    for b, n in enumerate(lens):
        if n % block_size:
            last = table[b, blocks_per_seq[b] - 1]
            k_cache[:, last, n % block_size :] = float("inf")
            v_cache[:, last, n % block_size :] = float("nan")
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.long)


def check(kernel, case, dtype, scale):
    q, k_cache, v_cache, table, lens = case
    assert k_cache.storage_offset() > 0 and v_cache.untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr()
    out = kernel(q, k_cache, v_cache, table, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    want = reference(q, k_cache, v_cache, table, lens, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    else:
        # float32 accumulation of the bf16 inputs, one rounding at the end: each element within bf16
        # rounding (half an ulp = 2**-9 relative) of the fp32 result on the same inputs
        err = (out.float() - want).abs()
        assert (err <= want.abs() * 2**-8 + 1e-5).all(), err.max()


LENGTHS = {
    "block_multiples": [16, 64, 320, 32],
    "one_token": [1, 1, 1],
    "ragged": [1, 17, 15, 320, 333, 48, 2, 100],
    # sequences shorter than the kernel's look-ahead (kFarBlocks) beside long ones: the prefetches that
    # run on into the next item's first blocks
    "short_and_long": [1, 5, 17, 33, 2, 49, 16, 64, 3, 700, 1, 18],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 16])
def test_matches_reference(kernel, dtype, lens, group, head_dim):
    case = make_case(lens=lens, kv_heads=3 if group != 4 else 2, group=group, head_dim=head_dim, dtype=dtype)
    check(kernel, case, dtype, scale=head_dim**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_kv_head_stride(kernel, dtype):
    case = make_case(lens=LENGTHS["ragged"], kv_heads=3, group=3, head_dim=64, dtype=dtype, head_strided=True)
    k_cache = case[1]
    assert not k_cache.is_contiguous() and k_cache.stride(0) != k_cache[0].numel()
    check(kernel, case, dtype, scale=0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(kernel, threads, dtype):
    case = make_case(lens=LENGTHS["ragged"], kv_heads=3, group=3, head_dim=64, seed=5, dtype=dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check(kernel, case, dtype, scale=0.125)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    ("lens", "kv_heads"),
    [([2048, 3, 17, 40], 3), ([1, 1, 1, 900], 2), ([500], 2)],
    ids=["long-first", "long-last", "fewer-items-than-threads"],
)
def test_threads_split_the_work_by_context(kernel, threads, lens, kv_heads):
    """Threads take ranges of equal context, not of equal item count: one long context among short ones
    (first or last), and fewer (sequence, kv head) items than threads; every item is computed once."""
    case = make_case(lens=lens, kv_heads=kv_heads, group=3, head_dim=64, seed=9)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check(kernel, case, torch.float32, scale=0.125)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("head_dim", "block_size"),
    [(128, 16), (72, 16), (64, 32), (80, 5), (64, 1)],
    ids=["d128", "d72-tail", "bs32", "d80-bs5", "bs1"],
)
def test_other_shapes(kernel, dtype, head_dim, block_size):
    """The other compiled head_dim (128), a head_dim with a remainder past the vector lanes, block sizes
    other than 16 (more rows than one 16-row score chunk, odd sizes, one token per block)."""
    case = make_case(lens=[1, 31, 64, 100, 7], kv_heads=2, group=4, head_dim=head_dim, block_size=block_size, dtype=dtype, seed=7)
    check(kernel, case, dtype, scale=head_dim**-0.5)


@pytest.mark.parametrize(
    ("head_dim", "block_size", "group"),
    [(64, 16, 3), (64, 16, 8), (64, 32, 1), (128, 16, 4), (128, 48, 3), (64, 8, 3)],
    ids=["d64-g3", "d64-g8", "d64-bs32", "d128-g4", "d128-bs48", "d64-bs8"],
)
def test_bf16_tile_and_vector_paths_agree(kernel, head_dim, block_size, group):
    """bf16 at the served head_dims: pass 1 on AMX tiles (where the CPU has them; use_amx=False forces the
    vector path) and pass 2 with its accumulators in registers, for groups wider than one register run
    (8 heads at d64, 4 at d128), block sizes that are several 16-row tile runs, and one (8) the tiles
    cannot take. Both must match the reference, and each other to within the accumulation order."""
    case = make_case(lens=[1, 15, 16, 17, 100, 333], kv_heads=2, group=group, head_dim=head_dim, block_size=block_size,
                     dtype=torch.bfloat16, seed=11)  # fmt: skip
    q, k_cache, v_cache, table, lens = case
    tiles = kernel(q, k_cache, v_cache, table, lens, head_dim**-0.5, use_amx=True)
    vector = kernel(q, k_cache, v_cache, table, lens, head_dim**-0.5, use_amx=False)
    for out in (tiles, vector):
        check(lambda *args: out, case, torch.bfloat16, scale=head_dim**-0.5)
    torch.testing.assert_close(tiles.float(), vector.float(), atol=2e-2, rtol=2**-7)


def test_tiles_are_used_where_the_cpu_has_them(kernel):
    """On a CPU with AMX-BF16 (the kernel is built with -march=native), bf16 scores run on tiles: Linux
    granted the process the tile registers."""
    flags = cpu_kernels._cpu_flags().split()
    has_amx = {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags)
    assert cpu_kernels.load_paged_decode_attention_module().amx_available() == has_amx


def prefetches_by_function(library: str) -> dict[str, int]:
    """Prefetch instructions in each function of a shared library's disassembly (objdump -d -C)."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    name = ""
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif re.search(r"\tprefetch(t0|t1|t2|nta)\b", line):
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_the_built_kernel_keeps_its_prefetches(kernel):
    """The kernel waits on memory, so its prefetches are most of its speed, and nothing else notices when
    the compiler drops them: gcc 12 deleted every call to a helper whose only effect was prefetching (it
    found the helper free of side effects), which left each fp32 head-dim-64 item with only its two
    leading prefetch loops and made the kernel 1.3-1.6x slower while every result stayed right. Where
    the build has AVX-512, the item loop must also hold the far prefetches (K and V) it spreads over the
    heads' scores; on AVX2, score_rows_f32_avx2 issues them."""
    module = cpu_kernels.load_paged_decode_attention_module()
    counts = prefetches_by_function(module.__file__)
    flags = set(cpu_kernels._cpu_flags().split())
    if "avx512f" in flags:
        fp32_items = [n for n in counts if n.startswith("(anonymous namespace)::decode_attention<float, 64>")]
        assert fp32_items and max(counts[n] for n in fp32_items) >= 4, counts
    elif {"avx2", "fma"} <= flags:
        assert any("score_rows_f32_avx2" in n for n in counts), counts
    else:
        pytest.skip("the spread prefetches are built for AVX-512 and AVX2 only")


def test_out_argument_is_written_and_checked(kernel):
    """out=: the result lands in the caller's tensor (the backend's output rows); a wrong one raises."""
    q, k_cache, v_cache, table, lens = case = make_case(lens=[3, 40], kv_heads=3, group=3, head_dim=64, dtype=torch.bfloat16)
    rows = torch.full((4, q.shape[1] * q.shape[2]), float("nan"), dtype=q.dtype)
    out = rows[1:3].view(q.shape)
    returned = kernel(q, k_cache, v_cache, table, lens, 0.125, out=out)
    assert returned.data_ptr() == out.data_ptr()
    check(lambda *args: out, case, torch.bfloat16, scale=0.125)
    assert rows[0].isnan().all() and rows[3].isnan().all(), "nothing written outside out"
    for bad in (out.float(), torch.empty(2, 9, 32, dtype=q.dtype), torch.empty(2, 9, 128, dtype=q.dtype)[..., :64]):
        with pytest.raises(RuntimeError, match="out must be"):
            kernel(q, k_cache, v_cache, table, lens, 0.125, out=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 64, 5000])
def test_write_kv_slots_matches_index_assignment(dtype, num_tokens):
    """The C++ slot writer against torch's advanced-index assignment, with k/v as strided views of one
    fused qkv output and head-strided caches; a long prefill's rows are split over threads."""
    write = cpu_kernels.load_paged_decode_attention_module().write_kv_slots
    gen = torch.Generator().manual_seed(num_tokens)
    kvh, nb, bs, d = 3, 400, 16, 64
    storage = torch.randn(2, kvh, 2, nb, bs, d, generator=gen).to(dtype).permute(2, 0, 1, 3, 4, 5)  # [L, 2, KVH, NB, BS, D]
    qkv = torch.randn(num_tokens, (9 + 2 * kvh) * d, generator=gen).to(dtype)
    _, k, v = qkv.split([9 * d, kvh * d, kvh * d], dim=-1)
    k, v = k.reshape(num_tokens, kvh, d), v.reshape(num_tokens, kvh, d)
    slots = torch.randperm(nb * bs, generator=gen)[:num_tokens]
    blocks, offsets = slots // bs, slots % bs
    want = storage.clone()
    want[1, 0][:, blocks, offsets] = k.transpose(0, 1)
    want[1, 1][:, blocks, offsets] = v.transpose(0, 1)
    got = storage.clone()
    assert not got[1, 0].is_contiguous()
    write(got[1, 0], got[1, 1], k, v, blocks, offsets)
    assert torch.equal(got, want)


def test_write_kv_slots_rejects_bad_input():
    write = cpu_kernels.load_paged_decode_attention_module().write_kv_slots
    k_cache, v_cache = torch.zeros(2, 4, 16, 8), torch.zeros(2, 4, 16, 8)
    k = v = torch.ones(3, 2, 8)
    ok_blocks, ok_offsets = torch.tensor([0, 1, 3]), torch.tensor([0, 15, 2])
    bad = {
        "block past the cache": (k_cache, v_cache, k, v, torch.tensor([0, 4, 1]), ok_offsets),
        "negative offset": (k_cache, v_cache, k, v, ok_blocks, torch.tensor([0, -1, 2])),
        "offset past the block": (k_cache, v_cache, k, v, ok_blocks, torch.tensor([0, 16, 2])),
        "int32 slots": (k_cache, v_cache, k, v, ok_blocks.int(), ok_offsets),
        "slot count": (k_cache, v_cache, k, v, ok_blocks[:2], ok_offsets[:2]),
        "dtype": (k_cache, v_cache, k.double(), v.double(), ok_blocks, ok_offsets),
        "kv heads": (k_cache, v_cache, torch.ones(3, 1, 8), torch.ones(3, 1, 8), ok_blocks, ok_offsets),
        "strided head_dim": (k_cache, v_cache, torch.ones(3, 2, 16)[..., ::2], v, ok_blocks, ok_offsets),
    }
    for what, args in bad.items():
        with pytest.raises(RuntimeError, match="write_kv_slots"):
            write(*args)
            pytest.fail(f"no error for {what}")
    assert not k_cache.any() and not v_cache.any(), "a rejected call writes nothing"


def test_large_scores(kernel):
    """Scores large enough that an unstabilised softmax would overflow, and a nearly one-hot softmax."""
    q, k_cache, v_cache, table, lens = make_case(lens=[5, 1, 9, 40], kv_heads=2, group=2, head_dim=16)
    check(kernel, (q * 30, k_cache, v_cache, table, lens), torch.float32, scale=1.0)


def test_empty_batch(kernel):
    q, k_cache, v_cache, _, _ = make_case(lens=[4], kv_heads=1, group=1, head_dim=16)
    out = kernel(q[:0], k_cache, v_cache, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1.0)
    assert out.shape == (0, 1, 16)


def test_bad_input_raises(kernel):
    q, k_cache, v_cache, table, lens = make_case(lens=[20, 5], kv_heads=3, group=3, head_dim=16)
    bad_calls = {
        "int32 block_table": (q, k_cache, v_cache, table.int(), lens),
        "int32 context_lens": (q, k_cache, v_cache, table, lens.int()),
        "heads not a multiple of kv heads": (q[:, :8], k_cache, v_cache, table, lens),
        "k/v shape mismatch": (q, k_cache, v_cache[:2], table, lens),
        "head_dim mismatch": (q[:, :, :8], k_cache, v_cache, table, lens),
        "dtype mismatch": (q.double(), k_cache, v_cache, table, lens),
        "float16": (q.half(), k_cache.half(), v_cache.half(), table, lens),
        "q not 3-d": (q[0], k_cache, v_cache, table, lens),
        "block_table rows": (q, k_cache, v_cache, table[:1], lens),
        "context_lens size": (q, k_cache, v_cache, table, lens[:1]),
        "context longer than table": (q, k_cache, v_cache, table[:, :1], lens),
        "zero context": (q, k_cache, v_cache, table, torch.tensor([0, 5])),
        "block id out of range": (q, k_cache, v_cache, torch.full_like(table, k_cache.shape[1]), lens),
        "negative block id": (q, k_cache, v_cache, torch.full_like(table, -1), lens),
        "strided head_dim": (q[..., :8], k_cache[..., ::2], v_cache[..., ::2], table, lens),
    }
    for what, args in bad_calls.items():
        with pytest.raises(RuntimeError):
            kernel(*args, 1.0)
            pytest.fail(f"no error for {what}")


def test_backend_decode_uses_kernel_and_matches_mask_path(kernel):
    """The torch backend's decode branch gives the same output through the kernel as through its mask path."""
    from services.engine.attention.backend import SequenceSlice
    from services.engine.attention.torch_backend import TorchAttentionBackend

    gen = torch.Generator().manual_seed(3)
    kvh, heads, d, bs, nb = 3, 9, 64, 16, 64
    storage = torch.randn(2, 2, kvh, nb, bs, d, generator=gen)
    lens = [1, 17, 40, 16]
    perm = torch.randperm(nb, generator=gen).tolist()
    slices, start = [], 0
    for i, n in enumerate(lens):
        blocks = perm[start : start + -(-n // bs)]
        start += len(blocks)
        slices.append(SequenceSlice(i, 1, n, blocks))
    q = torch.randn(len(lens), heads, d, generator=gen)
    k = torch.randn(len(lens), kvh, d, generator=gen)
    v = torch.randn(len(lens), kvh, d, generator=gen)

    fused = TorchAttentionBackend()
    assert fused.decode_kernel is not None
    plain = TorchAttentionBackend()
    plain.decode_kernel = plain.kv_writer = None
    outs = []
    for backend in (fused, plain):
        cache = storage.clone()
        meta = backend.build_metadata(slices, len(lens), bs)
        assert meta.decode_context_lens.dtype == torch.long
        outs.append(backend.forward(q, k, v, cache[1, 0], cache[1, 1], meta, d**-0.5))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)

    # A step's metadata remembers which kernels its layers use, decided at the first layer; another
    # backend running the same metadata decides for itself (here: without kernels, the mask path).
    meta = fused.build_metadata(slices, len(lens), bs)
    assert meta.route is None
    fused.forward(q, k, v, storage.clone()[1, 0], storage.clone()[1, 1], meta, d**-0.5)
    assert meta.route.decode_kernel and meta.route.decodes_only
    cache = storage.clone()
    torch.testing.assert_close(plain.forward(q, k, v, cache[1, 0], cache[1, 1], meta, d**-0.5), outs[1], atol=1e-5, rtol=1e-5)
    assert not meta.route.decode_kernel


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("TANDEM_DISABLE_CPU_KERNELS", "1")
    cpu_kernels.load_paged_decode_attention_module.cache_clear()
    try:
        assert load_paged_decode_attention() is None
    finally:
        cpu_kernels.load_paged_decode_attention_module.cache_clear()


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def broken(name, source):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.delenv("TANDEM_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_kernels, "_compile", broken)
    cpu_kernels.load_paged_decode_attention_module.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert load_paged_decode_attention() is None
            assert load_paged_decode_attention() is None  # cached: no second attempt, no second warning
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "torch fallback" in warnings[0].getMessage() and "Ninja" in warnings[0].getMessage()
    finally:
        cpu_kernels.load_paged_decode_attention_module.cache_clear()


def test_build_hash_depends_on_cpu_flags(monkeypatch, tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int x;")
    h1 = cpu_kernels.build_hash(src)
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "sse sse2")
    h2 = cpu_kernels.build_hash(src)
    src.write_text("int y;")
    h3 = cpu_kernels.build_hash(src)
    assert len({h1, h2, h3}) == 3
