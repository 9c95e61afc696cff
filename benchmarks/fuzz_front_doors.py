"""Send many generated bad requests to both front doors of a local cluster and count what came back.

    python benchmarks/fuzz_front_doors.py                 # 10,000 requests, seed 0, its own cluster
    python benchmarks/fuzz_front_doors.py -n 20000 --seed 3 --concurrency 16

It starts a cluster (etcd, tokenizer, one prefill and one decode worker on the default model, the
gateway; free loopback ports), sends the requests of tests/helpers/front_door_fuzz.py (half HTTP,
half gRPC), then checks that no process died, that every worker is idle with its invariants intact
(Worker.CheckIntegrity) and that a normal greedy request gives the answer it gave before. It prints
the counts by HTTP status / gRPC code and exits 1 when any answer was a 500, UNKNOWN, INTERNAL or
a hang, or a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402
from tests.helpers.front_door_fuzz import FrontDoorFuzz  # noqa: E402


def greedy_answer(address: str) -> list[int]:
    request = gateway_pb2.GenerateRequest(text="The capital of France is", sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0))
    with grpc.insecure_channel(address) as channel:
        return [t for chunk in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=60) for t in chunk.token_ids]


def worker_problems(cluster, names: list[str], timeout: float = 60.0) -> list[str]:
    problems = []
    for name in names:
        with grpc.insecure_channel(cluster.service(name).address) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            deadline = time.monotonic() + timeout
            while stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5).num_requests_running and time.monotonic() < deadline:
                time.sleep(0.2)
            check = stub.CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=10)
            if not check.ok:
                problems.append(f"{name}: {check.problem}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before an unanswered request counts as a hang")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)

    from tandem.launcher import ClusterSpec, LocalCluster

    spec = ClusterSpec(
        free_ports=True, lease_ttl=5, worker_args=["--threads", "1", "--kv-cache-gb", "0.25"], workdir=Path(tempfile.mkdtemp(prefix="tandem-fuzz-"))
    )
    cluster = LocalCluster(spec)
    cluster.start(timeout=300)
    try:
        before = greedy_answer(cluster.gateway_address)
        procs = {s.name: s.proc for s in cluster.services}
        t0 = time.perf_counter()
        fuzz = FrontDoorFuzz(cluster.gateway_http_url, cluster.gateway_address, seed=args.seed, concurrency=args.concurrency, timeout=args.timeout)
        result = asyncio.run(fuzz.run(args.num_requests))
        seconds = time.perf_counter() - t0
        died = [s.name for s in cluster.services if s.proc is not procs[s.name] or s.proc.poll() is not None]
        problems = worker_problems(cluster, [s.name for s in cluster.services if s.name.startswith(("prefill", "decode"))])
        after_ok = greedy_answer(cluster.gateway_address) == before
    finally:
        cluster.stop()

    print(f"{sum(result.outcomes.values())} requests in {seconds:.0f} s (seed {args.seed}, concurrency {args.concurrency})")
    for outcome, count in sorted(result.outcomes.items()):
        print(f"  {outcome:<28} {count:>7}")
    print(f"bad answers (500 / UNKNOWN / INTERNAL / hang): {result.num_bad}")
    for outcome, data in result.bad[:10]:
        print(f"  {outcome}: {data}")
    print(f"processes died: {died or 'none'}; integrity: {problems or 'clean'}; normal request after: {'same answer' if after_ok else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps({"outcomes": dict(result.outcomes), "bad": result.bad, "died": died, "integrity": problems,
                                         "after_ok": after_ok, "seconds": seconds}, indent=2))  # fmt: skip
    return 0 if not result.bad and not died and not problems and after_ok else 1


if __name__ == "__main__":
    sys.exit(main())
