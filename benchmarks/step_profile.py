"""Where an engine step's time goes, op by op: the model's matmuls (by weight), attention and the fused
layer steps, in prefill steps and in decode steps.

    python -m benchmarks.step_profile --dtype float32
    python -m benchmarks.step_profile --dtype bfloat16 --batch 64 --prompt-len 256

Queues --batch random prompts (greedy, ignore_eos, prefix caching off), times the first --prefill-steps
steps (prefill chunks under the engine's step budget, 8,192 tokens offline), then --decode-steps decode
steps of all --batch sequences. Each call of the model's Linear, layer ops and attention backend is
wrapped in a wall-clock timer (the wrappers add ~1 us a call: ~0.5 ms of a 30-layer step); "rest" is
the step's time outside them (embedding, sampling, scheduling, Python). Prints ms per step and share.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from benchmarks.engine_throughput import random_prompts

LAYER_OPS = ("rms_norm", "add_rms_norm", "rope", "rope_leading_heads_", "silu_and_mul")


def instrument(core, spent: dict[str, float], on: list[bool]) -> None:
    """Wrap the model's calls so that each adds its wall time to spent[name] while on[0]."""
    model = core.runner.model

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if not on[0]:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    names = {id(model.lm_head): "lm_head"}
    for layer in model.layers:
        names.update({id(getattr(layer, n)): n for n in ("qkv", "o_proj", "gate_up", "down")})
    linear = model.linear

    class TimedLinear:
        def __call__(self, x, w, b=None):
            return timed(f"linear {names.get(id(w), '?')}", linear)(x, w, b)

        def gate_up_silu(self, x, w, silu_and_mul):
            if id(w) in linear.swiglu_panels:  # the fused matmul (silu inside it: not timed on its own)
                return timed("linear gate_up + silu (fused)", linear.gate_up_silu)(x, w, untimed_silu)
            return silu_and_mul(self(x, w))

        def __getattr__(self, name):
            return getattr(linear, name)

    untimed_silu = model.ops.silu_and_mul
    wrapped = TimedLinear()
    model.linear = wrapped
    for layer in model.layers:
        layer.linear = wrapped
    for name in LAYER_OPS:
        if hasattr(model.ops, name):
            setattr(model.ops, name, timed(name, getattr(model.ops, name)))
    core.runner.backend.forward = timed("attention", core.runner.backend.forward)


def report(kind: str, spent: dict[str, float], steps: int, total: float) -> dict:
    print(f"{kind}: {total * 1e3 / steps:.1f} ms a step ({steps} steps)")
    rows = dict(sorted(spent.items(), key=lambda kv: -kv[1]))
    rows["rest"] = total - sum(spent.values())
    for name, s in rows.items():
        print(f"   {name:32s} {s * 1e3 / steps:9.2f} ms  {100 * s / total:5.1f}%")
    return {"ms_per_step": total * 1e3 / steps, "ms": {k: v * 1e3 / steps for k, v in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the step budget (the server's default)")
    ap.add_argument("--prefill-steps", type=int, default=6)
    ap.add_argument("--decode-steps", type=int, default=20)
    args = ap.parse_args()

    from services.engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, kv_cache_memory_gb=2.0, enable_prefix_caching=False,
              max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    core = llm.engine
    spent: dict[str, float] = collections.defaultdict(float)
    on = [False]
    instrument(core, spent, on)
    params = SamplingParams(max_tokens=args.decode_steps + 4, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.batch, args.prompt_len, core.model_config.vocab_size, seed=0)):
        core.add_request(f"r{i}", prompt, params)
    results = {}
    for kind, steps in (("prefill", args.prefill_steps), ("decode", args.decode_steps)):
        if kind == "decode":  # until every sequence has its first token: then steps are decode only
            while any(not r.output_token_ids for r in core.requests.values()):
                core.step()
        spent.clear()
        on[0] = True
        t = time.perf_counter()
        for _ in range(steps):
            core.step()
        total = time.perf_counter() - t
        on[0] = False
        results[kind] = report(kind, spent, steps, total)
    print(json.dumps({"benchmark": "step_profile", "dtype": args.dtype, "batch": args.batch, **results}))


if __name__ == "__main__":
    main()
