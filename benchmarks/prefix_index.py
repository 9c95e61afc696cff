"""The gateway's prefix index: match() latency and memory with 1M indexed (hash, worker) entries.

    python -m benchmarks.prefix_index

For 100 and 1,000 workers sharing 1M entries (random block hashes, applied as real KVEventBatch
messages), a 2,000-token prompt (125 blocks) is matched: against every worker, against a tenth of
them by id, and a prompt nobody holds. Two holdings: 10% of workers hold a random-length prefix of
the prompt, and every worker holds all of it (the worst case for the walk). Latency is p50/p99 of
2,000 calls after a warm-up; memory is tracemalloc's count for building the index.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc

from gateway.prefix_index import PrefixIndex
from protos.tandem.v1 import worker_pb2

ENTRIES = 1_000_000
PROMPT_BLOCKS = 125


def build(num_workers: int, prompt: list[int], share: float, all_full: bool, seed: int = 0) -> PrefixIndex:
    rng = random.Random(seed)
    per = ENTRIES // num_workers
    index = PrefixIndex(max_entries=ENTRIES)
    for w in range(num_workers):
        hashes = [rng.getrandbits(64) for _ in range(per)]
        if all_full or rng.random() < share:
            k = len(prompt) if all_full else rng.randint(1, len(prompt))
            hashes[:k] = prompt[:k]
        events = [worker_pb2.KVEvent(stored=worker_pb2.BlocksStored(block_hashes=hashes[i : i + 125])) for i in range(0, per, 125)]
        assert index.apply(f"decode-{w:04d}", worker_pb2.KVEventBatch(sequence=1, events=events))
    return index


def percentiles_us(fn, n: int = 2000) -> tuple[float, float]:
    for _ in range(50):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return times[n // 2] / 1e3, times[int(n * 0.99)] / 1e3


def main() -> None:
    rng = random.Random(42)
    prompt = [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS)]
    miss = [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS)]
    print(f"match() of a {PROMPT_BLOCKS}-block prompt, {ENTRIES:,} entries; p50 / p99 in µs")
    for num_workers in (100, 1000):
        for label, share, all_full in (("10% hold a prefix", 0.1, False), ("all hold all of it", 0.0, True)):
            gc.collect()
            index = build(num_workers, prompt, share, all_full)
            some = [f"decode-{w:04d}" for w in range(num_workers // 10)]
            cells = [percentiles_us(lambda: index.match(prompt)), percentiles_us(lambda: index.match(prompt, some)), percentiles_us(lambda: index.match(miss))]
            print(f"{num_workers:5d} workers, {label:18s}  all: {cells[0][0]:6.1f} / {cells[0][1]:6.1f}   "
                  f"10% by id: {cells[1][0]:6.1f} / {cells[1][1]:6.1f}   miss: {cells[2][0]:6.1f} / {cells[2][1]:6.1f}")  # fmt: skip
            index = None  # freed before the next build
    for num_workers in (100, 1000):
        gc.collect()
        tracemalloc.start()
        index = build(num_workers, prompt, 0.1, False)
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        print(f"memory at {index.num_entries:,} entries, {num_workers} workers: {size / 2**20:.0f} MiB")
        index = None


if __name__ == "__main__":
    main()
