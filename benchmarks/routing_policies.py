"""Routing policies compared on one workload, in one run: prefix-aware vs round-robin vs random
(and least-loaded), over simulated or real workers, measured by `tandem bench`.

    # 8 simulated decode workers (the calibrated timing model), the issue's shared-prefix workload
    python -m benchmarks.routing_policies sim --decode 8 --time-scale 0.25 --rate 3.4 --num-prompts 320

    # real workers on this machine (default model, 1 thread each), a small shared-prefix workload
    python -m benchmarks.routing_policies real --decode 2 --prefill 1 --rate 0.3 --num-prompts 40 \
        --num-groups 4 --system-prompt-len 512 --question-len 64 --output-len 16

Everything runs as separate processes on free loopback ports: etcd, the gateway (`tandem serve
gateway`), the workers (`python -m loadtest.sim.fleet`, or `tandem up`'s launcher for real ones)
and the load generator (`tandem bench shared-prefix`). For each policy the workers start afresh
(empty caches: simulated fleets restart; real workers get a fresh cache salt per run, which makes
every earlier block useless to the new run), the policy is set live through the etcd key
(`tandem scheduling set`), and `tandem bench` runs the same seeded workload (same prompts, same
Poisson arrivals). `tandem bench compare` lays the results side by side; this script adds the
workload's ideal prefix hit rate (every request but each group's first finds its system prompt
cached) and the goals of the endpoint-picker issue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.scheduling.live_config import put_scheduling_document
from gateway.scheduling.registry import POLICIES
from tandem.etcd_process import EtcdProcess
from tandem.launcher import free_ports

from .sim_stack import SimStack, wait_for_workers


class RealWorkers:
    """Real prefill/decode workers and their gateway from the local launcher, started once; each
    policy's run gets a fresh cache salt from `tandem bench`, so no run reuses another's blocks."""

    def __init__(self, args, etcd: str, cluster: str, workdir: Path):
        from tandem.launcher import ClusterSpec, LocalCluster

        worker_args = ["--threads", "1", "--kv-cache-gb", str(args.kv_cache_gb)]
        gateway_args = ["--disagg-min-uncached-tokens", str(args.disagg_min_uncached_tokens), "--log-level", "warning"]
        spec = ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, cluster=cluster, etcd=etcd, free_ports=True, tokenizer=False,
                           worker_args=worker_args, role_args={"gateway": gateway_args}, workdir=workdir / "cluster")  # fmt: skip
        self.cluster = LocalCluster(spec)
        self.cluster.start(timeout=600)
        self.gateway = self.cluster.gateway_address

    def close(self) -> None:
        self.cluster.stop()


def bench(args, gateway: str, policy: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tandem", "bench", "shared-prefix", "--gateway", gateway, "--num-groups", str(args.num_groups),
           "--system-prompt-len", str(args.system_prompt_len), "--prompts-per-group", str(args.prompts_per_group), "--question-len", str(args.question_len), "--output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--request-rate", str(args.rate), "--seed", str(args.seed), "--serving-mode", args.serving_mode,
           "--label", policy, "--metadata", f"routing={policy}", "--out", str(out), "--no-progress"]  # fmt: skip
    if args.slo:
        cmd += ["--slo", args.slo]
    subprocess.run(cmd, check=True)
    return json.loads((out / "result.json").read_text())


def ideal_hit_rate(args, block_size: int = 16) -> float:
    """The cached share of prompt tokens if every request found every earlier request's blocks
    (perfect affinity, caches that never evict): each group's first request misses its system
    prompt, every later one hits its full blocks. From the very prompts `tandem bench` sends."""
    from loadtest.distributions import Distribution
    from loadtest.workloads import SharedPrefixWorkload

    workload = SharedPrefixWorkload(args.num_groups, args.prompts_per_group, args.system_prompt_len, Distribution.parse(args.question_len),
                                    Distribution.parse(args.output_len), seed=args.seed)  # fmt: skip
    seen, cached, total = set(), 0, 0
    jobs = workload.jobs()
    for _ in range(args.num_prompts):
        spec = next(jobs).next_request(None)
        group = spec.tags["group"]
        total += len(spec.token_ids)
        if group in seen:
            cached += (args.system_prompt_len // block_size) * block_size
        seen.add(group)
    return cached / total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workers", choices=["sim", "real"])
    p.add_argument("--policies", default="prefix-aware,round-robin,random", help=f"comma-separated, of {', '.join(POLICIES)}")
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--prefill", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=0.25, help="sim: multiply every simulated time (0.25: four times faster than the calibration)")
    p.add_argument("--num-kv-blocks", type=int, default=1456, help="sim: KV blocks per worker (1456 = 1 GiB of the default model)")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="real: KV cache per worker")
    p.add_argument("--num-groups", type=int, default=32)
    p.add_argument("--system-prompt-len", type=int, default=2000)
    p.add_argument("--prompts-per-group", type=int, default=16, help="per round of the workload (tandem bench's default)")
    p.add_argument("--question-len", default="200")
    p.add_argument("--output-len", default="64")
    p.add_argument("--num-prompts", type=int, default=320)
    p.add_argument("--rate", type=float, required=True, help="Poisson arrivals, requests per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serving-mode", default="auto", choices=["auto", "aggregated", "disaggregated"])
    p.add_argument("--disagg-min-uncached-tokens", type=int, default=512, help="the gateway's P/D threshold (with prefill workers)")
    p.add_argument("--slo", default=None, help="passed to tandem bench (goodput)")
    p.add_argument("--out", type=Path, default=Path("results/routing"))
    args = p.parse_args()
    policies = [x.strip() for x in args.policies.split(",")]
    for policy in policies:
        if policy not in POLICIES:
            p.error(f"unknown policy {policy!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tandem-routing-"))
    results = {}
    if args.workers == "sim":
        fleet_args = ["--time-scale", str(args.time_scale), "--num-kv-blocks", str(args.num_kv_blocks)]
        gateway_args = ["--disagg-min-uncached-tokens", str(args.disagg_min_uncached_tokens)]
        with SimStack(workdir, args.decode, args.prefill, fleet_args, gateway_args) as stack:
            for i, policy in enumerate(policies):
                if i:
                    stack.restart_fleet()  # empty caches for every policy
                stack.set_policy(policy)
                print(f"\n=== {policy} ===", flush=True)
                results[policy] = bench(args, stack.gateway, policy, args.out / policy)
    else:
        etcd_port, peer_port = free_ports(2)
        etcd = EtcdProcess(workdir / "etcd", etcd_port, peer_port, workdir / "etcd.log")
        etcd.start()
        workers = None
        try:
            etcd.wait_healthy()
            workers = RealWorkers(args, etcd.endpoint, "routing-bench", workdir)
            wait_for_workers(workers.gateway, args.decode)
            for policy in policies:
                asyncio.run(put_scheduling_document(etcd.endpoint, "routing-bench", json.dumps({"policy": policy})))
                time.sleep(1.0)
                print(f"\n=== {policy} ===", flush=True)
                results[policy] = bench(args, workers.gateway, policy, args.out / policy)
        finally:
            if workers is not None:
                workers.close()
            etcd.stop()
    subprocess.run([sys.executable, "-m", "tandem", "bench", "compare", *(str(args.out / pol / "result.json") for pol in policies),
                    "--out", str(args.out)], check=True)  # fmt: skip
    print(f"\nworkload: {args.num_groups} groups x {args.system_prompt_len}-token system prompt, {args.question_len}-token questions, "
          f"{args.output_len} output tokens, {args.num_prompts} requests, Poisson {args.rate}/s, seed {args.seed}")  # fmt: skip
    ideal = ideal_hit_rate(args)
    print(f"ideal prefix hit rate of the workload: {ideal:.3f}")
    header = f"{'policy':14s} {'hit rate':>9s} {'of ideal':>9s} {'TTFT p50':>10s} {'TTFT p90':>10s} {'TPOT p50':>9s} {'out tok/s':>10s} {'req/s':>7s}"
    print(header)
    for policy, r in results.items():
        hit = r.get("prefix_cache_hit_rate") or 0.0
        print(f"{policy:14s} {hit:9.3f} {hit / ideal:9.1%} {r['median_ttft_ms']:10.0f} {r['p90_ttft_ms']:10.0f} {r['median_tpot_ms']:9.1f} "
              f"{r['output_throughput']:10.1f} {r['request_throughput']:7.2f}")  # fmt: skip
    if "prefix-aware" in results and "round-robin" in results:
        pa, rr = results["prefix-aware"], results["round-robin"]
        speedup = rr["p90_ttft_ms"] / pa["p90_ttft_ms"]
        print(f"\ngoal TTFT p90 >= 3x lower than round-robin: {speedup:.1f}x ({'met' if speedup >= 3 else 'NOT met'})")
        share = (pa.get("prefix_cache_hit_rate") or 0.0) / ideal
        print(f"goal hit rate >= 90% of ideal: {share:.0%} ({'met' if share >= 0.9 else 'NOT met'})")
    failures = ", ".join(f"{policy}: {r.get('failed', 0)}" for policy, r in results.items())
    print(f"(failed requests: {failures}; results in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
