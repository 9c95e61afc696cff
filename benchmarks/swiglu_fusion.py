"""The fused SwiGLU gate/up matmul (csrc/panel_linear.cpp's panel_swiglu) against the matmul followed
by the separate silu_and_mul, in one engine, alternating step by step.

    python -m benchmarks.swiglu_fusion --dtype bfloat16 --mode prefill
    python -m benchmarks.swiglu_fusion --dtype bfloat16 --mode decode --batch 64

The engine packs bf16 [gate; up] weights for the fused matmul where the panel kernel has it (AVX512-BF16
builds); this also packs them as plain panels, and switches the fused path off (Linear.swiglu_panels
emptied) for every other step, so both run on the same weights, cache and KV state. prefill: steps of 8
fresh 256-token prompts (2,048 tokens, the server's step budget); decode: steps of --batch running
sequences. Prints median and min per path and their ratio (fused / separate); the first step of each
path is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.engine_throughput import random_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    ap.add_argument("--batch", type=int, default=64, help="decode: running sequences")
    ap.add_argument("--steps", type=int, default=0, help="steps of each path (default: prefill 8, decode 30)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from services.engine import LLM, SamplingParams

    llm = LLM(model="default", dtype=args.dtype, num_threads=args.threads, kv_cache_memory_gb=3.0, enable_prefix_caching=False)
    core = llm.engine
    model, linear = core.runner.model, core.runner.model.linear
    if not linear.swiglu_panels:
        raise SystemExit(f"no fused gate/up matmul here ({args.dtype}; it needs bf16 and a build with AVX512-BF16)")
    for layer in model.layers:  # plain panels too, for the separate path's steps
        linear.panels[id(layer.gate_up)] = linear.panel_module.pack_panels(layer.gate_up)
    fused_panels = dict(linear.swiglu_panels)

    def use_fused(on: bool) -> None:
        linear.swiglu_panels.clear()
        if on:
            linear.swiglu_panels.update(fused_panels)

    vocab = core.model_config.vocab_size
    steps = args.steps or (8 if args.mode == "prefill" else 30)
    times: dict[bool, list[float]] = {True: [], False: []}
    if args.mode == "decode":
        params = SamplingParams(max_tokens=2 * steps + 8, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(random_prompts(args.batch, 256, vocab, seed=1)):
            core.add_request(f"r{i}", prompt, params)
        while any(not r.output_token_ids for r in core.requests.values()):
            core.step()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for s in range(2 * steps):
        fused = s % 2 == 0
        if args.mode == "prefill":
            for i, prompt in enumerate(random_prompts(8, 256, vocab, seed=100 + s)):
                core.add_request(f"p{s}-{i}", prompt, params)
        use_fused(fused)
        t = time.perf_counter()
        core.step()
        times[fused].append(time.perf_counter() - t)
        if args.mode == "prefill":
            while core.has_work():
                core.step()
    out = {"benchmark": "swiglu_fusion", "dtype": args.dtype, "mode": args.mode, "batch": args.batch if args.mode == "decode" else 8}
    for fused, label in ((False, "separate"), (True, "fused")):
        ts = times[fused][1:]
        out[label] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "steps": len(ts)}
        print(f"{label:8s}  median {out[label]['median_ms']:9.2f} ms  min {out[label]['min_ms']:9.2f} ms  ({len(ts)} steps)")
    out["ratio_median"] = out["fused"]["median_ms"] / out["separate"]["median_ms"]
    out["ratio_min"] = out["fused"]["min_ms"] / out["separate"]["min_ms"]
    print(f"fused / separate: median {out['ratio_median']:.3f}, min {out['ratio_min']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
