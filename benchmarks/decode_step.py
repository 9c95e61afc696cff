"""One engine's decode step, timed: the figure behind the kernel and packing changes in docs/benchmarks.md.

    python -m benchmarks.decode_step --dtype bfloat16 --batch 64      # 64 running sequences
    python -m benchmarks.decode_step --dtype bfloat16 --batch 1       # batch-1 decode

Prefills `--batch` random 256-token prompts (greedy, ignore_eos, prefix caching off), then times
`--steps` decode steps of EngineCore.step() and prints min / p25 / median in ms. The minimum is the
robust figure on a shared 2-core VM (a step the OS interrupted only gets slower).

A new engine's pool hands a prompt consecutive blocks; `--aged-pool N` first cycles the pool N times
with simulated requests of the same shape (allocate, free tail first, as the engine does), so the
block tables are scattered as in a worker that has served a while (see benchmarks/kv_layout.py)."""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.engine_throughput import random_prompts
from benchmarks.kv_layout import age_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--aged-pool", type=int, default=0, metavar="CYCLES", help="cycle the block pool this many times first")
    args = ap.parse_args()

    from services.engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, kv_cache_memory_gb=2.0, enable_prefix_caching=False)
    core = llm.engine
    if args.aged_pool:
        age_pool(core.kv.pool, args.batch, args.prompt_len // core.config.block_size, core.config.block_size, args.aged_pool)
    params = SamplingParams(max_tokens=args.steps + 10, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.batch, args.prompt_len, core.model_config.vocab_size)):
        core.add_request(f"r{i}", prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.requests.values()):
        core.step()
    for _ in range(3):  # warm-up steps
        core.step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        core.step()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "batch": args.batch,
                "threads": args.threads,
                "aged_pool_cycles": args.aged_pool,
                "min_ms": round(times[0], 1),
                "p25_ms": round(times[len(times) // 4], 1),
                "median_ms": round(times[len(times) // 2], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
