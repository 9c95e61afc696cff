"""`tandem bench`: load-test a running Tandem (or one worker) and report vLLM-comparable numbers.

    tandem bench random        --input-len 256 --output-len 128 --request-rate 4 --num-prompts 200 --out r/
    tandem bench shared-prefix --num-groups 8 --prompts-per-group 16 --system-prompt-len 512 --out s/
    tandem bench multi-turn    --num-turns 4 --question-len 64 --max-concurrency 4 --out m/
    tandem bench file prompts.jsonl --request-rate 2 --out f/
    tandem bench compare r1/result.json r2/result.json --out cmp/

Every workload takes the same target, load, sampling, metric and output options (see --help of
each). docs/benchmarking.md has the standard scenarios. This module parses the command line;
bench_setup.py builds the run's parts from it, bench.py runs them, load_runner.py is the load
runner, metrics.py the arithmetic, result.py the files, plots.py the pictures.
It imports nothing heavy until a command runs, because `tandem`'s parser is built for every
subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_GATEWAY = "127.0.0.1:50050"
WORKLOADS = ("random", "shared-prefix", "multi-turn", "file")


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    t = p.add_argument_group("target")
    t.add_argument("--gateway", default=DEFAULT_GATEWAY, help=f"gateway address (default {DEFAULT_GATEWAY}, what `tandem up` prints)")
    t.add_argument(
        "--worker",
        metavar="ADDRESS",
        default=None,
        help="benchmark one decode worker's Decode.Generate directly instead of the gateway (token-id prompts only)",
    )
    t.add_argument(
        "--serving-mode",
        choices=["auto", "aggregated", "disaggregated"],
        default="auto",
        help="force where prompts are prefilled (gateway only; default: the gateway decides)",
    )
    t.add_argument(
        "--cache-salt",
        default="fresh",
        help="cache_salt sent with every request: 'fresh' (default) draws a new one per run, so a run never finds an earlier "
        "run's prompts in the prefix cache; 'none' sends none (share the cache with earlier runs); anything else is sent as is",
    )
    t.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the target to answer (default 10)")
    t.add_argument(
        "--backend",
        choices=["tandem", "openai"],
        default="tandem",
        help="tandem: the gateway's gRPC API (default); openai: any OpenAI-compatible HTTP server at --base-url "
        "(Tandem's gateway, vLLM, SGLang, ...): /v1/completions for token ids and text, /v1/chat/completions for chat",
    )
    t.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="--backend openai: the API's base URL (default http://127.0.0.1:8000/v1)")
    t.add_argument("--model", default=None, help="--backend openai: the model to ask for (default: the first the server lists)")
    t.add_argument(
        "--api-key",
        default=None,
        help="sent as `authorization: Bearer KEY` (default: $TANDEM_API_KEY for the gateway's gRPC API, $OPENAI_API_KEY with --backend openai)",
    )
    t.add_argument(
        "--tls-ca",
        default=os.environ.get("TANDEM_TLS_CA"),
        help="a CA file: connect with TLS to a front door whose certificate it signed, e.g. `tandem up --tls`'s "
        "WORKDIR/certs/ca.pem (gRPC gateway, or an https --base-url; env TANDEM_TLS_CA)",
    )
    t.add_argument(
        "--no-return-token-ids",
        dest="return_token_ids",
        action="store_false",
        help="--backend openai: do not ask for token ids (vLLM's return_token_ids) from a server that rejects unknown fields; "
        "each streamed event then counts as one token",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        default="inf",
        help="requests (jobs) per second, open loop; inf = all at once (default). A list (1,2,4) sweeps the rates; 'auto' sweeps up to the measured saturation",
    )
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the gaps between arrivals: 1 = Poisson (default), <1 burstier, inf = constant rate"
    )
    load.add_argument(
        "--max-concurrency",
        default=None,
        help="at most this many jobs in flight; with an infinite rate, a closed loop at this concurrency. A list (1,2,4) sweeps it",
    )
    load.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="measured jobs to send (multi-turn: conversations); default 100, or one round of the shared-prefix groups, or the file's lines",
    )
    load.add_argument("--duration", type=float, default=None, help="send for this many seconds (after the warm-up) instead of a number of prompts")
    load.add_argument(
        "--warmup", type=int, default=0, help="jobs sent first and finished before the measured ones (as vllm bench serve --num-warmups); not measured"
    )
    load.add_argument(
        "--warmup-seconds",
        type=float,
        default=0.0,
        help="leave out the jobs sent in the first this many seconds (run under the same load: a steady-state window)",
    )
    load.add_argument("--request-timeout", type=float, default=300.0, help="deadline of each request in seconds (default 300)")
    load.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="duration runs: seconds in-flight requests may take after sending stops, then they are cancelled (default: the request timeout)",
    )
    load.add_argument("--sweep-points", type=int, default=5, help="points of a --request-rate auto sweep (default 5)")
    load.add_argument("--stop-at-saturation", action="store_true", help="end a rate sweep at the first point that cannot keep up")
    load.add_argument("--saturation-threshold", type=float, default=0.9, help="a point is saturated below this share of its offered rate (default 0.9)")

    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let the model stop at EOS (default: ignore EOS, so outputs are as long as the workload asks)",
    )
    s.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed = this + the request's index")

    w = p.add_argument_group("workload (common)")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrivals: same seed, same run (default 0)")
    w.add_argument("--vocab-size", type=int, default=49152, help="random token ids are drawn from [0, this) (default 49152, SmolLM2's)")

    m = p.add_argument_group("metrics")
    m.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el", help="which latencies get statistics: ttft,tpot,itl,e2el,ntpot")
    m.add_argument("--metric-percentiles", default="90,99", help="percentiles reported besides mean and median (default 90,99)")
    m.add_argument("--slo", default=None, help="goodput objectives in ms, e.g. ttft=500,tpot=50,e2e=5000 (a request is good when it meets all)")

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, help="directory for result.json, requests.jsonl and the PNG plots")
    o.add_argument("--label", default=None, help="a name for this run in tables and compare (default: the workload and load)")
    o.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="recorded in the result (e.g. routing=prefix-aware)")
    o.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw PNGs")
    o.add_argument("--no-details", dest="details", action="store_false", help="leave the per-request arrays out of result.json")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _prompt_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-format",
        choices=["tokens", "text"],
        default="tokens",
        help="tokens: random token ids (default); text: English words (~1 token each) tokenized by the gateway",
    )


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The `bench` subcommands, on `parser` (tandem's `bench` subparser, or a standalone one)."""
    common = _common_options()
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join((*WORKLOADS, "compare")) + "}")

    r = sub.add_parser("random", parents=[common], help="random prompts; input/output lengths from distributions (vLLM's random)")
    r.add_argument(
        "--input-len", default="256", help="prompt tokens: N, uniform:LO:HI, normal:MEAN:STD, exponential:MEAN, lognormal:MEDIAN:SIGMA (default 256)"
    )
    r.add_argument("--output-len", default="128", help="output tokens, same forms (default 128)")
    r.add_argument("--random-range-ratio", type=float, default=0.0, help="vLLM's: fixed lengths L become uniform over [L(1-r), L(1+r)]")
    _prompt_format(r)

    s = sub.add_parser("shared-prefix", parents=[common], help="groups of prompts sharing a system prompt, in token ids (prefix caching, routing)")
    s.add_argument("--num-groups", type=int, default=8, help="distinct system prompts (default 8)")
    s.add_argument("--prompts-per-group", type=int, default=16, help="prompts per group in each round (default 16)")
    s.add_argument("--system-prompt-len", type=int, default=512, help="tokens of each group's shared prefix (default 512)")
    s.add_argument("--question-len", default="64", help="tokens after the prefix, a distribution (default 64)")
    s.add_argument("--output-len", default="64", help="output tokens, a distribution (default 64)")

    t = sub.add_parser("multi-turn", parents=[common], help="conversations whose every turn resends the history")
    t.add_argument("--num-turns", default="4", help="turns per conversation, a distribution (default 4)")
    t.add_argument("--question-len", default="64", help="tokens of each user message, a distribution (default 64)")
    t.add_argument("--output-len", default="64", help="output tokens per turn, a distribution (default 64)")
    t.add_argument("--system-prompt-len", type=int, default=0, help="tokens of a system prompt at the start (default 0: none)")
    t.add_argument("--shared-system-prompt", action="store_true", help="every conversation starts with the same system prompt")
    t.add_argument("--turn-delay", default="0", help="seconds between an answer and the next question, a distribution (default 0)")
    _prompt_format(t)

    f = sub.add_parser("file", parents=[common], help="prompts (or token counts) from a JSONL file")
    f.add_argument(
        "path",
        type=Path,
        help='one JSON object a line: {"prompt": ...} | {"messages": [...]} | {"prompt_token_ids": [...]} | {"input_len": N}; optional "output_len"',
    )
    f.add_argument("--output-len", default="128", help="output tokens for lines without their own, a distribution (default 128)")
    f.add_argument("--shuffle", action="store_true", help="send the lines in a seeded random order (each pass)")

    c = sub.add_parser("compare", help="several result.json files side by side: one table, one plot")
    c.add_argument("results", nargs="+", type=Path, help="result.json files (tandem bench, or vLLM bench serve)")
    c.add_argument("--labels", default=None, help="comma-separated names, one per file (default: each result's label)")
    c.add_argument("--out", type=Path, default=None, help="directory for the comparison plot")
    c.add_argument("--no-plots", dest="plots", action="store_false")


def run(args, argv: list[str] | None = None) -> int:
    """Run a parsed `bench` command. Errors a user can fix print one line and return 2 (or 1 when
    the target cannot be reached)."""
    if args.bench_command == "compare":
        from .compare import compare

        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        written = compare(args.results, labels, args.out, args.plots)
        if written:
            print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
        return 0
    import asyncio

    import uvloop

    from .bench import Bench

    bench = Bench(args, argv)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(bench.main())
    except ConnectionError as e:
        print(f"tandem bench: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem bench", description="Load-test Tandem: vLLM-comparable latency and throughput numbers")
    add_bench_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except ValueError as e:
        print(f"tandem bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
