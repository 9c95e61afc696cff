"""Prefill attention alone, one layer of a prefill step: the paged prefill kernel against torch's SDPA.

    python -m benchmarks.prefill_attention                            # 8 prompts x 256 tokens, bf16
    python -m benchmarks.prefill_attention --chunks 32 --dtype float32 # the offline 8,192-token step

Both run through TorchAttentionBackend.forward on the same step (whole prompts of --chunk-len tokens,
blocks shuffled over the cache), so each pays what the engine pays: the kernel reads the paged cache
directly, SDPA gathers each chunk's blocks first. The two are timed alternately, call by call, so a
change in the machine's speed lands on both. Prints median and best milliseconds per call (one layer)
and the per-step figure (x --layers).
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

from services.engine.attention.backend import SequenceSlice  # noqa: E402
from services.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=8, help="prompts in the step")
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=30, help="layers per step, for the per-step figure")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kernel_backend = TorchAttentionBackend()
    if not kernel_backend._use_prefill_kernel(torch.empty(1, args.heads, args.head_dim, dtype=dtype), torch.empty(1, dtype=dtype)):
        print(f"the paged prefill kernel does not run {args.dtype} / head_dim {args.head_dim} here", file=sys.stderr)
        return 1
    sdpa_backend = TorchAttentionBackend()
    sdpa_backend.prefill_kernel = None

    gen = torch.Generator().manual_seed(0)
    blocks_per = -(-args.chunk_len // args.block_size)
    num_blocks = 2 * args.chunks * blocks_per
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    slices = [SequenceSlice(i * args.chunk_len, args.chunk_len, args.chunk_len, perm[i * blocks_per : (i + 1) * blocks_per]) for i in range(args.chunks)]
    tokens = args.chunks * args.chunk_len
    cache = torch.randn(2, args.kv_heads, num_blocks, args.block_size, args.head_dim, generator=gen).to(dtype)
    q = torch.randn(tokens, args.heads, args.head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, args.kv_heads, args.head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, args.kv_heads, args.head_dim, generator=gen).to(dtype)
    scale = args.head_dim**-0.5
    runs = {}
    for name, backend in (("kernel", kernel_backend), ("sdpa", sdpa_backend)):
        meta = backend.build_metadata(slices, tokens, args.block_size)
        runs[name] = lambda backend=backend, meta=meta: backend.forward(q, k, v, cache[0], cache[1], meta, scale)
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.iters):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    result = {"benchmark": "prefill_attention", **vars(args)}
    for name, ts in times.items():
        result[name] = {"median_ms": round(statistics.median(ts), 3), "best_ms": round(min(ts), 3),
                        "per_step_ms": round(statistics.median(ts) * args.layers, 1)}  # fmt: skip
    result["speedup_median"] = round(result["sdpa"]["median_ms"] / result["kernel"]["median_ms"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
