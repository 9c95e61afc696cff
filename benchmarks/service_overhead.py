"""What the services cost: the same requests through the gateway and on the in-process engine.

    python -m benchmarks.service_overhead --threads 2 --out results/service_overhead.json

Runs one workload twice, one after the other on the same machine:
  1. in process: AsyncEngine, requests submitted from the event loop (no gRPC);
  2. through Tandem: `tandem up`'s processes (etcd, tokenizer, gateway, one decode worker, no
     prefill worker) on free ports; the client streams Gateway.Generate over loopback gRPC.
Workloads, greedy with ignore_eos and random prompt token ids (no tokenizer hop, no prefix hits):
  - sequential: N requests one at a time → TTFT and inter-token latency (ITL) at the client;
  - concurrent: M requests at once → output tokens/s.
The difference is the cost of the gateway hop, the worker's gRPC stream and protobuf, per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import uvloop

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass
class Timing:
    ttft_ms: float
    itl_ms: float  # mean gap between tokens after the first
    num_tokens: int


@dataclass
class Result:
    path: str
    seq_ttft_ms_p50: float
    seq_itl_ms_p50: float
    conc_tok_per_s: float
    conc_wall_s: float


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]


def timing(start: float, token_times: list[float]) -> Timing:
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return Timing((token_times[0] - start) * 1e3, statistics.mean(gaps) * 1e3 if gaps else 0.0, len(token_times))


# ---- in process ---------------------------------------------------------------------------------


async def run_engine_request(engine, request_id: str, ids: list[int], max_tokens: int) -> Timing:
    from services.engine import SamplingParams

    start, token_times = time.perf_counter(), []
    stream = await engine.add_request(request_id, ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    async for out in stream:
        token_times += [time.perf_counter()] * len(out.new_token_ids)
    return timing(start, token_times)


async def bench_in_process(args) -> Result:
    from services.engine.async_engine import AsyncEngine
    from services.engine.engine_config import EngineConfig

    engine = AsyncEngine(EngineConfig(model="default", num_threads=args.threads, kv_cache_memory_gb=0.5, enable_prefix_caching=False))
    try:
        await run_engine_request(engine, "warmup", prompts(1, args.prompt_len, 99)[0], 4)
        seq = [await run_engine_request(engine, f"s{i}", p, args.max_tokens) for i, p in enumerate(prompts(args.sequential, args.prompt_len, 1))]
        t0 = time.perf_counter()
        conc = await asyncio.gather(
            *(run_engine_request(engine, f"c{i}", p, args.max_tokens) for i, p in enumerate(prompts(args.concurrent, args.prompt_len, 2)))
        )
        wall = time.perf_counter() - t0
    finally:
        await engine.shutdown()
    return summarize("in-process AsyncEngine", seq, conc, wall)


# ---- through the gateway ------------------------------------------------------------------------


async def run_gateway_request(stub, ids: list[int], max_tokens: int) -> Timing:
    request = gateway_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    )
    start, token_times = time.perf_counter(), []
    async for chunk in stub.Generate(request, timeout=600):
        token_times += [time.perf_counter()] * len(chunk.token_ids)
    return timing(start, token_times)


async def bench_gateway(args, gateway_address: str) -> Result:
    async with grpc.aio.insecure_channel(gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await run_gateway_request(stub, prompts(1, args.prompt_len, 99)[0], 4)
        seq = [await run_gateway_request(stub, p, args.max_tokens) for p in prompts(args.sequential, args.prompt_len, 1)]
        t0 = time.perf_counter()
        conc = await asyncio.gather(*(run_gateway_request(stub, p, args.max_tokens) for p in prompts(args.concurrent, args.prompt_len, 2)))
        wall = time.perf_counter() - t0
    return summarize("gateway → decode worker (gRPC)", seq, conc, wall)


def summarize(path: str, seq: list[Timing], conc: list[Timing], wall: float) -> Result:
    return Result(
        path,
        statistics.median(t.ttft_ms for t in seq),
        statistics.median(t.itl_ms for t in seq),
        sum(t.num_tokens for t in conc) / wall,
        wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the engine (in process and in the worker)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from tandem.launcher import ClusterSpec, LocalCluster

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    results = [uvloop.run(bench_in_process(args))]
    spec = ClusterSpec(num_prefill=0, num_decode=1, free_ports=True, metrics=False,
                       worker_args=["--threads", str(args.threads), "--kv-cache-gb", "0.5"],
                       workdir=Path(tempfile.mkdtemp(prefix="tandem-bench-")))  # fmt: skip
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        results.append(uvloop.run(bench_gateway(args, cluster.gateway_address)))
    finally:
        cluster.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    print(
        f"{args.sequential} sequential + {args.concurrent} concurrent requests × {args.prompt_len} prompt tokens × {args.max_tokens} output tokens, {args.threads} threads"
    )
    print(f"{'path':34} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'conc tok/s':>11}")
    for r in results:
        print(f"{r.path:34} {r.seq_ttft_ms_p50:12.1f} {r.seq_itl_ms_p50:11.2f} {r.conc_tok_per_s:11.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "args": vars(args),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "benchmark_process_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "results": [asdict(r) for r in results],
        }
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
