"""The paged decode attention kernel alone, at a decode step's shapes: every layer's call of one step.

    python -m benchmarks.attention_kernel                       # SmolLM2-135M shapes, 64 sequences, bf16
    python -m benchmarks.attention_kernel --batch 8 --context 1024 --dtype float32

The cache is laid out as the engine's (services/engine/kv_cache.py): block-major over --layers layers,
so a block's K and V rows of every kv head and layer are one run, on transparent huge pages. Blocks
are scattered at random over twice the blocks the batch needs (as in a worker that has served for a
while), so the kernel pays its real random-access cost, and each timed step calls the kernel once per
layer in turn, so that, as in a step, the next layer's rows are not in cache. The single-layer loop
this had before kept part of a layer's ~31 MB in the last-level cache from call to call, and its
tensors were on 4 KiB pages with each kv head's blocks apart: its fp32 figure moved 1.6-3.2 ms a layer
between runs. Prints the median and best of --iters timed steps after a warm-up, per step and per
layer, in milliseconds, and the K/V bytes read per second at the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.engine.cpu_kernels import load_paged_decode_attention  # noqa: E402
from services.engine.kv_cache import KVCache  # noqa: E402


def make_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, layers: int = 1, seed: int = 0):
    """q, [(k_cache, v_cache) of each layer], block_table, context_lens: the kernel's arguments."""
    gen = torch.Generator().manual_seed(seed)
    # contexts spread over ±25% around --context, as a running batch's are
    lens = torch.randint(max(1, context * 3 // 4), context * 5 // 4 + 1, (batch,), generator=gen)
    max_blocks = int(-(-lens.max() // block_size))
    num_blocks = 2 * batch * max_blocks
    # the engine's own KV cache (block-major storage on huge pages, per-layer views); it reads only
    # these three fields of a model's config
    kv = KVCache(SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim), num_blocks, block_size, dtype)
    kv.storage.copy_(torch.randn(kv.storage.shape, generator=gen))
    caches = kv.layers
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).contiguous()
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    return q, caches, table, lens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=320, help="mean context length (default 320: 256 in + half of 128 out)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=30, help="layers per decode step, each with its own cache")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20, help="timed steps (each one call per layer)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = load_paged_decode_attention()
    if kernel is None:
        print("the paged decode attention kernel did not build here (see the logged warning)", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    q, caches, table, lens = make_inputs(args.batch, args.context, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, args.layers)
    scale = args.head_dim**-0.5

    def step() -> float:
        t0 = time.perf_counter()
        for k, v in caches:
            kernel(q, k, v, table, lens, scale)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(2):
        step()
    times = [step() for _ in range(args.iters)]
    median, best = statistics.median(times), min(times)
    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * q.element_size() * args.layers
    print(json.dumps({"kernel": "paged_decode_attention", **vars(args), "step_median_ms": round(median, 2), "step_best_ms": round(best, 2),
                      "layer_median_ms": round(median / args.layers, 4), "kv_gb_per_s": round(kv_bytes / median / 1e6, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
