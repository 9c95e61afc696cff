"""vLLM's offline engine on the comparison workload: one JSON line on stdout.

    python vllm_offline.py MODEL_DIR --dtype bfloat16 --num-prompts 64 --input-len 256 --output-len 128

Same prompts as Tandem's side (random token ids, seed 0, ids in [100, vocab-100)), greedy, ignore_eos,
prefix caching off. Also batch-1 decode: one 128-token prompt, time per output token after the first
(the difference between 65 and 1 output tokens, so prefill is left out)."""

import argparse
import json
import os
import random
import time

import vllm_shim  # noqa: F401


def machine_busy_seconds() -> float:
    """CPU time of every process on the machine (/proc/stat), so an engine's helper processes count."""
    fields = open("/proc/stat").readline().split()[1:8]
    return (sum(int(x) for x in fields) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    t_load = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False, seed=0)
    load_s = time.perf_counter() - t_load
    vocab = llm.get_tokenizer().vocab_size
    ps = [{"prompt_token_ids": p} for p in prompts(args.num_prompts, args.input_len, vocab)]
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate(ps[:2], SamplingParams(max_tokens=4, **greedy), use_tqdm=False)  # warm-up

    w0, c0 = time.perf_counter(), machine_busy_seconds()
    outs = llm.generate(ps, SamplingParams(max_tokens=args.output_len, **greedy), use_tqdm=False)
    wall, cpu = time.perf_counter() - w0, machine_busy_seconds() - c0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)

    one = [{"prompt_token_ids": ps[0]["prompt_token_ids"][:128]}]

    def timed(max_tokens: int) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            llm.generate(one, SamplingParams(max_tokens=max_tokens, **greedy), use_tqdm=False)
            best = min(best, time.perf_counter() - t)
        return best

    batch1_ms = (timed(65) - timed(1)) / 64 * 1000
    print(
        json.dumps(
            {
                "engine": "vllm",
                "dtype": args.dtype,
                "output_tokens": n_out,
                "wall_s": wall,
                "machine_cpu_s": cpu,
                "output_tok_per_s": n_out / wall,
                "batch1_decode_ms_per_token": batch1_ms,
                "load_s": load_s,
                "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
