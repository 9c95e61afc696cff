"""Decode attention on the two KV layouts, with fresh and aged block tables: why the cache is block-major.

    python -m benchmarks.kv_layout --dtype bfloat16
    python -m benchmarks.kv_layout --dtype float32 --out results/kv_layout_fp32.json

One decode step's attention (the compiled kernel, every layer of SmolLM2-135M's shapes, 64
sequences of ~320 tokens) over the same keys and values stored two ways:
  - layer-major  [layers, 2, kv heads, blocks, block size, head dim] (the layout before): one
    (layer, kv head)'s blocks are adjacent 2-4 KiB runs;
  - block-major  [blocks, layers, 2, kv heads, block size, head dim] (services/engine/kv_cache.py):
    a block is one contiguous run, which the KV transport sends in place.
and three kinds of block table:
  - fresh:  a new pool's order: each prompt's blocks consecutive, decode blocks interleaved
            across sequences (what a benchmark's first batch gets);
  - aged:   the tables of the running batch after the real BlockPool has been cycled --cycles
            times by requests of the same shape (allocate, free tail first, as the engine does):
            what a worker that has served a while hands out;
  - random: a random permutation of the cache's blocks.
Runs alternate between the layouts; prints the median ms per step (all layers).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.engine.block_pool import BlockPool  # noqa: E402
from services.engine.cpu_kernels import load_paged_decode_attention  # noqa: E402
from services.engine.malloc_tuning import advise_huge_pages  # noqa: E402


def batch_tables(pool: BlockPool, lens: list[int], prompt_blocks: int, block_size: int) -> list[list[int]]:
    """The tables a batch gets from `pool` as the engine allocates them: all prompts first, then one
    block per sequence each time the batch crosses a block boundary. From a new pool (which hands out
    ids in order) each prompt's blocks are consecutive and decode blocks interleave across sequences."""
    tables = [pool.allocate(prompt_blocks) for _ in lens]
    for j in range(prompt_blocks, max(-(-n // block_size) for n in lens)):
        for t, n in zip(tables, lens):
            if j < -(-n // block_size):
                t += pool.allocate(1)
    return tables


def age_pool(pool: BlockPool, batch: int, prompt_blocks: int, block_size: int, cycles: int, seed: int = 1) -> None:
    """Run `cycles` × pool.num_blocks block allocations through the pool by a batch of requests of
    one shape (prompt_blocks blocks, then 96-160 tokens more), each freed tail first when it
    finishes, as KVCacheManager does; every block is free again at the end, in the order a worker
    that has served a while would hand them out."""
    rng = random.Random(seed)
    running: list[list] = []  # [block ids, tokens, final length]

    def admit() -> None:
        running.append([pool.allocate(prompt_blocks), prompt_blocks * block_size, prompt_blocks * block_size + rng.randint(96, 160)])

    for _ in range(batch):
        admit()
    allocated = 0
    while allocated < cycles * pool.num_blocks:
        for r in list(running):
            r[1] += 1
            if r[1] > len(r[0]) * block_size:
                r[0] += pool.allocate(1)
                allocated += 1
            if r[1] >= r[2]:
                pool.free(list(reversed(r[0])))
                running.remove(r)
                admit()
                allocated += prompt_blocks
    for r in running:
        pool.free(list(reversed(r[0])))


def aged_tables(lens: list[int], num_blocks: int, prompt_blocks: int, block_size: int, cycles: int, seed: int) -> list[list[int]]:
    """The tables a batch gets from a real BlockPool aged by age_pool()."""
    pool = BlockPool(num_blocks)
    age_pool(pool, len(lens), prompt_blocks, block_size, cycles, seed)
    return batch_tables(pool, lens, prompt_blocks, block_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--context", type=int, default=320, help="mean context length (256 in + half of 128 out)")
    p.add_argument("--pool-gb", type=float, default=2.0, help="KV pool size, as the engine's default")
    p.add_argument("--cycles", type=int, default=5, help="pool cycles before the aged tables are taken")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = load_paged_decode_attention()
    if kernel is None:
        print("the paged decode attention kernel did not build here", file=sys.stderr)
        return 1
    L, KVH, H, D, BS = 30, 3, 9, 64, 16  # SmolLM2-135M
    dtype = getattr(torch, args.dtype)
    block_bytes = L * 2 * KVH * BS * D * torch.empty((), dtype=dtype).element_size()
    num_blocks = int(args.pool_gb * 2**30 // block_bytes)
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.context * 3 // 4, args.context * 5 // 4 + 1, (args.batch,), generator=gen)
    prompt_blocks = args.prompt_len // BS
    lens = torch.maximum(lens, torch.tensor(prompt_blocks * BS))

    values = torch.randn(num_blocks, L, 2, KVH, BS, D, generator=gen).to(dtype)
    block_major = torch.empty_like(values)
    advise_huge_pages(block_major)  # as KVCache does, before the first touch
    block_major.copy_(values)
    layer_major = torch.empty(L, 2, KVH, num_blocks, BS, D, dtype=dtype)
    advise_huge_pages(layer_major)
    layer_major.copy_(values.permute(1, 2, 3, 0, 4, 5))
    del values
    layouts = {
        "layer_major": [(layer_major[i, 0], layer_major[i, 1]) for i in range(L)],
        "block_major": [(block_major[:, i, 0].transpose(0, 1), block_major[:, i, 1].transpose(0, 1)) for i in range(L)],
    }
    q = torch.randn(args.batch, H, D, generator=gen).to(dtype)
    width = max(-(-int(n) // BS) for n in lens)

    def as_tensor(tables: list[list[int]]) -> torch.Tensor:
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)

    tables = {
        "fresh": as_tensor(batch_tables(BlockPool(num_blocks), lens.tolist(), prompt_blocks, BS)),
        "aged": as_tensor(aged_tables(lens.tolist(), num_blocks, prompt_blocks, BS, args.cycles, seed=1)),
        "random": torch.randperm(num_blocks, generator=gen)[: args.batch * width].view(args.batch, width),
    }
    result = {"dtype": args.dtype, "batch": args.batch, "num_blocks": num_blocks, "ms_per_step": {}}
    for name, table in tables.items():
        ref = kernel(q, *layouts["layer_major"][0], table, lens, 0.125)
        assert torch.equal(ref, kernel(q, *layouts["block_major"][0], table, lens, 0.125)), "the layouts disagree"
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for rep in range(args.reps + 2):
            for key in list(layouts) if rep % 2 == 0 else list(layouts)[::-1]:
                t = time.perf_counter()
                for k, v in layouts[key]:
                    kernel(q, k, v, table, lens, 0.125)
                if rep >= 2:
                    times[key].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["ms_per_step"][name] = med
        print(
            f"{name:7s} tables, {args.dtype}: layer-major {med['layer_major']:6.2f} ms, block-major {med['block_major']:6.2f} ms ({med['block_major'] / med['layer_major'] - 1:+.1%})"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
