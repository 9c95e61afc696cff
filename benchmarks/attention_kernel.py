"""The paged decode attention kernel alone: one layer's call at a decode step's shapes.

    python -m benchmarks.attention_kernel                       # SmolLM2-135M shapes, 64 sequences, bf16
    python -m benchmarks.attention_kernel --batch 8 --context 1024 --dtype float32

Blocks are scattered at random over a cache several times larger than the batch needs (as in a
worker that has served for a while), so the kernel pays its real random-access cost. Prints the
median and best of --iters timed calls after a warm-up, in milliseconds per call (one layer), and
what that is per decode step (× --layers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.engine.cpu_kernels import load_paged_decode_attention  # noqa: E402


def make_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # contexts spread over ±25% around --context, as a running batch's are
    lens = torch.randint(max(1, context * 3 // 4), context * 5 // 4 + 1, (batch,), generator=gen)
    max_blocks = int(-(-lens.max() // block_size))
    num_blocks = 4 * batch * max_blocks
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).contiguous()
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, lens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=320, help="mean context length (default 320: 256 in + half of 128 out)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=30, help="layers per decode step, for the per-step figure")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = load_paged_decode_attention()
    if kernel is None:
        print("the paged decode attention kernel did not build here (see the logged warning)", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    q, k, v, table, lens = make_inputs(args.batch, args.context, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype)
    scale = args.head_dim**-0.5
    for _ in range(10):
        kernel(q, k, v, table, lens, scale)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        kernel(q, k, v, table, lens, scale)
        times.append((time.perf_counter() - t0) * 1e3)
    median, best = statistics.median(times), min(times)
    print(json.dumps({"kernel": "paged_decode_attention", **vars(args), "median_ms": round(median, 4), "best_ms": round(best, 4),
                      "per_step_ms": round(median * args.layers, 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
