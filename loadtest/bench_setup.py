"""A `tandem bench` run's parts, built from the parsed command line (bench_cli.py parses it):
the workload, the load shape (or the sweep's variable and values), the target, the metric options,
the metadata and the default label. Bench (bench.py) calls these; errors a user can fix are
ValueErrors naming the option. Imports nothing heavy until called, like bench_cli.py.
"""

from __future__ import annotations

import math
import os


def make_workload(args, seed: int):
    from .distributions import Distribution, with_range_ratio
    from .workloads import (
        FileWorkload,
        MultiTurnWorkload,
        RandomWorkload,
        SharedPrefixWorkload,
    )

    d = Distribution.parse
    if args.bench_command == "random":
        return RandomWorkload(with_range_ratio(d(args.input_len), args.random_range_ratio), with_range_ratio(d(args.output_len), args.random_range_ratio),
                              args.vocab_size, args.prompt_format, seed)  # fmt: skip
    if args.bench_command == "shared-prefix":
        return SharedPrefixWorkload(
            args.num_groups, args.prompts_per_group, args.system_prompt_len, d(args.question_len), d(args.output_len), args.vocab_size, seed
        )
    if args.bench_command == "multi-turn":
        return MultiTurnWorkload(d(args.num_turns), d(args.question_len), d(args.output_len), args.system_prompt_len, args.shared_system_prompt,
                                 d(args.turn_delay), args.vocab_size, args.prompt_format, seed)  # fmt: skip
    return FileWorkload(args.path, d(args.output_len), args.vocab_size, args.shuffle, seed)


def default_num_prompts(args, workload) -> int:
    if args.bench_command == "shared-prefix":
        return args.num_groups * args.prompts_per_group
    if args.bench_command == "file":
        return len(workload.entries)
    return 16 if args.bench_command == "multi-turn" else 100


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--request-rate {text!r}: a number of requests per second, inf, a list (1,2,4) or auto") from None


def _concurrency(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--max-concurrency {text!r}: a whole number, or a list (1,2,4) to sweep") from None


def make_load(args, workload):
    from .load_runner import LoadSpec
    from .sweep import parse_values

    rates = parse_values(args.request_rate, integer=False)
    concurrencies = parse_values(args.max_concurrency, integer=True) if args.max_concurrency is not None else None
    if rates is not None and concurrencies is not None:
        raise ValueError("sweep one of --request-rate and --max-concurrency, not both")
    num_prompts = args.num_prompts
    if num_prompts is None and args.duration is None:
        num_prompts = default_num_prompts(args, workload)
    load = LoadSpec(
        # a listed sweep starts at its first rate (each point sets its own; inf here would make a
        # duration-limited sweep fail validation); 'auto' measures saturation at an infinite rate
        request_rate=(rates[0] if rates else math.inf) if rates is not None else _rate(args.request_rate),
        burstiness=args.burstiness,
        max_concurrency=_concurrency(args.max_concurrency) if concurrencies is None else concurrencies[0],
        num_prompts=num_prompts, duration=args.duration, warmup=args.warmup, warmup_seconds=args.warmup_seconds,
        request_timeout=args.request_timeout, drain_timeout=args.drain_timeout, seed=args.seed,
    )  # fmt: skip
    if rates is not None:
        return load, "request_rate", rates
    if concurrencies is not None:
        return load, "max_concurrency", concurrencies
    return load, None, None


def make_target(args):
    from .targets import GatewayTarget, SamplingOptions, WorkerTarget

    sampling = SamplingOptions(args.temperature, args.top_p, args.top_k, args.ignore_eos, args.sampling_seed)
    if args.backend == "openai":
        from .openai_target import OpenAITarget

        if args.worker or args.serving_mode != "auto":
            raise ValueError("--worker and --serving-mode are for the gRPC backend; --backend openai sends what any OpenAI-compatible server takes")
        return OpenAITarget(args.base_url, sampling, args.model, args.api_key or os.environ.get("OPENAI_API_KEY"), args.return_token_ids, tls_ca=args.tls_ca)
    if args.worker:
        if getattr(args, "prompt_format", "tokens") == "text":
            raise ValueError("--worker takes token ids only: drop --prompt-format text, or benchmark the gateway")
        if args.serving_mode != "auto":
            raise ValueError("--serving-mode is the gateway's decision; a worker always serves aggregated")
        if args.tls_ca:
            raise ValueError("--tls-ca is for the gateway's front door; a TLS worker requires a client certificate: benchmark it through the gateway")
        return WorkerTarget(args.worker, sampling)
    return GatewayTarget(args.gateway, sampling, args.serving_mode, api_key=args.api_key or os.environ.get("TANDEM_API_KEY"), tls_ca=args.tls_ca)


def metric_options(args):
    from .metrics import LATENCY_METRICS, SLO
    from .result import MetricOptions

    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    for m in metrics:
        if m not in LATENCY_METRICS:
            raise ValueError(f"--percentile-metrics: unknown {m!r}; choose from {', '.join(LATENCY_METRICS)}")
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: comma-separated numbers in (0, 100]") from None
    if any(not 0 < p <= 100 for p in percentiles):
        raise ValueError("--metric-percentiles must each be in (0, 100]")
    slo = SLO.parse(args.slo) if args.slo else None
    return MetricOptions(percentiles, metrics, slo, args.details)


def parse_metadata(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {item!r}: write KEY=VALUE")
        out[key] = value
    return out


def default_label(args, load, variable) -> str:
    if variable:
        return f"{args.bench_command}-sweep-{variable.replace('_', '-')}"
    if math.isfinite(load.request_rate):
        return f"{args.bench_command}-{load.request_rate:g}rps" + (f"-c{load.max_concurrency}" if load.max_concurrency else "")
    return f"{args.bench_command}-c{load.max_concurrency}" if load.max_concurrency else f"{args.bench_command}-all-at-once"
