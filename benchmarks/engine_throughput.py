"""Offline engine benchmark: Tandem vs transformers in one run, against this machine's ceilings.

    python -m benchmarks.engine_throughput --dtypes float32 bfloat16 --threads 2

Measures, per dtype, in one process (so both engines see the same machine state):
  - the machine: matmul peak (GFLOP/s) and memory read bandwidth (GB/s);
  - offline throughput, 64 requests × 256 random prompt tokens × 128 output tokens, greedy,
    ignore_eos: Tandem's LLM.generate vs transformers generate() in static batches of 16 (left
    padding), their ratio, and Tandem as a fraction of the compute ceiling (workload FLOPs ÷ peak);
  - batch-1 decode time per token beside the bandwidth floor (weight bytes ÷ read bandwidth);
  - TTFT of a 1,024-token prompt cold vs with 960 tokens already in the prefix cache.
Results print as a table and are written as JSON (--out). Wall and CPU time are both recorded:
numbers collapse when another process holds a core, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch


def measure_matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def measure_read_bandwidth(nbytes: int = 1 << 30, reps: int = 9) -> float:
    """Median GB/s of summing a 1 GiB tensor (the median: best-of-N swung from 47 to 77 GB/s here)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[reps // 2] / 1e9


def workload_flops(cfg, num_requests: int, prompt_len: int, output_len: int, skip_prefill_lm_head: bool = False) -> float:
    """2 × parameters × tokens for the matmuls, plus attention's QK and PV (4 × heads × head_dim × context)."""
    lm_head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_parameters(include_embedding=False)
    total_tokens = prompt_len + output_len - 1  # the last output token is never fed back
    matmul = 2 * body * total_tokens + 2 * lm_head * (output_len if skip_prefill_lm_head else total_tokens)
    attn_per_layer = 4 * cfg.num_heads * cfg.head_dim
    attention = sum(attn_per_layer * (p + 1) for p in range(total_tokens)) * cfg.num_layers
    return num_requests * (matmul + attention)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def bench_tandem(model_dir: str, dtype: str, prompts, output_len: int, args) -> dict:
    from services.engine import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype=dtype,
        num_threads=args.threads,
        kv_cache_memory_gb=args.kv_cache_gb,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    outs, wall, cpu = timed(lambda: llm.generate(prompt_token_ids=prompts, sampling_params=params))
    n_out = sum(len(o.token_ids) for o in outs)
    result = {"output_tokens": n_out, "wall_s": wall, "cpu_s": cpu, "output_tok_per_s": n_out / wall}

    # batch-1 decode: one request, time per output token after the first
    one = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
    core = llm.engine
    core.add_request("b1", prompts[0][:128], one)
    stamps = []
    while core.has_work():
        for _ in core.step():
            stamps.append(time.perf_counter())
    result["batch1_decode_ms_per_token"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000

    # TTFT cold vs warm (960 of 1,024 prompt tokens cached), with the prefix cache on
    llm = LLM(model=model_dir, dtype=dtype, num_threads=args.threads, kv_cache_memory_gb=args.kv_cache_gb, max_num_batched_tokens=2048)
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prefix = random_prompts(1, 960, llm.engine.model_config.vocab_size, seed=7)[0]
    cold_prompt = prefix + random_prompts(1, 64, llm.engine.model_config.vocab_size, seed=8)[0]
    warm_prompt = prefix + random_prompts(1, 64, llm.engine.model_config.vocab_size, seed=9)[0]
    llm.generate(prompt_token_ids=[random_prompts(1, 1024, llm.engine.model_config.vocab_size, seed=10)[0]], sampling_params=first)
    _, cold, _ = timed(lambda: llm.generate(prompt_token_ids=[cold_prompt], sampling_params=first))
    out, warm, _ = timed(lambda: llm.generate(prompt_token_ids=[warm_prompt], sampling_params=first))
    assert out[0].num_cached_tokens == 960, out[0].num_cached_tokens
    result.update(ttft_cold_ms=cold * 1000, ttft_warm_ms=warm * 1000, ttft_speedup=cold / warm)
    return result


def bench_transformers(model_dir: str, dtype: torch.dtype, prompts, output_len: int, batch: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    # equal-length random prompts: left padding is a no-op here, as in the reference measurement
    def run():
        n = 0
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                ids = torch.tensor(prompts[i : i + batch])
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0
                )
                n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return n

    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:2]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    n_out, wall, cpu = timed(run)
    return {"output_tokens": n_out, "wall_s": wall, "cpu_s": cpu, "output_tok_per_s": n_out / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from services.engine.model_config import ModelConfig, parse_dtype
    from services.model_files.model_dir import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    cfg = ModelConfig.from_dir(model_dir)
    prompts = random_prompts(args.num_requests, args.prompt_len, cfg.vocab_size)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "read_bandwidth_GBps": measure_read_bandwidth(),
        },
        "workload": {"model": args.model, "requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len},
        "results": {},
    }
    flops = workload_flops(cfg, args.num_requests, args.prompt_len, args.output_len)
    for name in args.dtypes:
        dtype = parse_dtype(name)
        peak = measure_matmul_peak(dtype)
        r = {"matmul_peak_GFLOPs": peak, "workload_TFLOP": flops / 1e12}
        r["ceiling_output_tok_per_s"] = args.num_requests * args.output_len / (flops / (peak * 1e9))
        r["tandem"] = bench_tandem(model_dir, name, prompts, args.output_len, args)
        r["tandem"]["fraction_of_ceiling"] = r["tandem"]["output_tok_per_s"] / r["ceiling_output_tok_per_s"]
        weight_bytes = cfg.num_parameters() * torch.empty((), dtype=dtype).element_size()
        r["bandwidth_floor_ms_per_token"] = weight_bytes / (report["machine"]["read_bandwidth_GBps"] * 1e9) * 1000
        if not args.skip_transformers:
            r["transformers"] = bench_transformers(model_dir, dtype, prompts, args.output_len, args.hf_batch)
            r["speedup_vs_transformers"] = r["tandem"]["output_tok_per_s"] / r["transformers"]["output_tok_per_s"]
        report["results"][name] = r
        print(json.dumps({name: r}, indent=2), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
