"""Tandem's offline engine on the comparison workload: one JSON line on stdout (the twin of
benchmarks/vllm_side/vllm_offline.py, which runs vLLM's in its own virtualenv).

    python -m benchmarks.tandem_offline --dtype bfloat16 --threads 2

Same prompts (random token ids, seed 0, ids in [100, vocab-100)), greedy, ignore_eos, prefix
caching off, LLM.generate's defaults otherwise. Batch-1 decode: one 128-token prompt, time per
output token after the first (65 output tokens minus 1, best of 3 each, so prefill is left out)."""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.engine_throughput import random_prompts
from benchmarks.machine_load import machine_busy_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = ap.parse_args()

    from services.engine import LLM, SamplingParams

    t_load = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        num_threads=args.threads,
        kv_cache_memory_gb=2.0,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    load_s = time.perf_counter() - t_load
    ps = random_prompts(args.num_prompts, args.input_len, llm.engine.model_config.vocab_size)
    greedy = dict(temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=ps[:2], sampling_params=SamplingParams(max_tokens=4, **greedy))

    w0, c0 = time.perf_counter(), machine_busy_seconds()
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(max_tokens=args.output_len, **greedy))
    wall, cpu = time.perf_counter() - w0, machine_busy_seconds() - c0
    n_out = sum(len(o.token_ids) for o in outs)

    one = [ps[0][:128]]

    def timed(max_tokens: int) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            llm.generate(prompt_token_ids=one, sampling_params=SamplingParams(max_tokens=max_tokens, **greedy))
            best = min(best, time.perf_counter() - t)
        return best

    batch1_ms = (timed(65) - timed(1)) / 64 * 1000
    print(
        json.dumps(
            {
                "engine": "tandem",
                "dtype": args.dtype,
                "output_tokens": n_out,
                "wall_s": wall,
                "machine_cpu_s": cpu,
                "output_tok_per_s": n_out / wall,
                "batch1_decode_ms_per_token": batch1_ms,
                "load_s": load_s,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
