"""The `tandem` command line: one entry point for every part of Tandem.

Subcommands so far:
  tandem model prepare            convert the embedded SmolLM2 default into its cached HF directory
  tandem generate "prompt"        generate with the engine in this process (--chat for chat messages)
Later subcommands (up, serve, bench) arrive with the services.
"""

from __future__ import annotations

import argparse
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF model directory, or 'default' (embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the engine (default: torch's)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache")


def cmd_model_prepare(args) -> int:
    from services.engine.default_model import prepare_default_model

    t = time.perf_counter()
    path = prepare_default_model(force=args.force)
    print(f"default model ready at {path} ({time.perf_counter() - t:.1f}s)")
    return 0


def cmd_generate(args) -> int:
    from services.engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, kv_cache_memory_gb=args.kv_cache_gb)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    t = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        out = llm.generate(args.prompt, params)[0]
    elapsed = time.perf_counter() - t
    print(out.text)
    print(
        f"[{len(out.token_ids)} tokens in {elapsed:.2f}s, finish_reason={out.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="LLM serving with disaggregated prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage models").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert the embedded default model (once; cached)")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    prep.set_defaults(func=cmd_model_prepare)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    _add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
