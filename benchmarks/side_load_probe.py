"""What other CPU work costs the offline engine, by where that work runs: nowhere, on a thread of the
engine's own process, or in another process.

    python -m benchmarks.side_load_probe --period-ms 20 --work-ms 2 --rounds 2

The engine (`LLM.generate`, bf16, 2 threads) runs the comparison workload (64 × 256 random prompt
tokens → 128, greedy, ignore_eos) while a side task sleeps `period` and then spins pure Python for
`work`, standing in for serving work (gRPC, an event loop, a gateway or a client on the same
cores). A thread of the engine's process mostly runs while the engine thread waits for the GIL; a
process of its own preempts the engine's OpenMP threads at any moment, and each preemption stalls
a 2-thread parallel region. One JSON line per run on stdout; docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
import time

from benchmarks.engine_throughput import random_prompts


def busy(period_s: float, work_s: float, stop) -> None:
    """Sleep `period_s`, then spin for `work_s`, until `stop` (an Event) is set."""
    while not stop.is_set():
        time.sleep(period_s)
        start = time.perf_counter()
        x = 0
        while time.perf_counter() - start < work_s:
            for i in range(200):
                x += i * i


def run_once(llm, prompts, where: str, period_s: float, work_s: float) -> float:
    from services.engine import SamplingParams

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event() if where == "process" else threading.Event()
    side = None
    if where == "thread":
        side = threading.Thread(target=busy, args=(period_s, work_s, stop), daemon=True)
    elif where == "process":
        side = ctx.Process(target=busy, args=(period_s, work_s, stop), daemon=True)
    if side is not None:
        side.start()
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
    wall = time.perf_counter() - start
    stop.set()
    if side is not None:
        side.join(timeout=10)
    return sum(len(o.token_ids) for o in outs) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--period-ms", type=float, default=20.0)
    ap.add_argument("--work-ms", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from services.engine import LLM, SamplingParams

    llm = LLM(model="default", dtype="bfloat16", num_threads=2, kv_cache_memory_gb=2.0, max_num_batched_tokens=8192, enable_prefix_caching=False)
    prompts = random_prompts(64, 256, llm.engine.model_config.vocab_size)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    for _ in range(args.rounds):
        for where in ("none", "thread", "process"):
            tok_s = run_once(llm, prompts, where, args.period_ms / 1000, args.work_ms / 1000)
            print(json.dumps({"side_task": where, "period_ms": args.period_ms, "work_ms": args.work_ms, "output_tok_per_s": round(tok_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
