"""What TLS on every hop costs (issue 14, item 7): the same cluster and workload with and without
`--tls`, in one run, through `tandem bench`.

    python -m benchmarks.tls_cost --out docs/results/tls_cost        # ABAB rounds, ~10 minutes
    python -m benchmarks.tls_cost --smoke --out /tmp/tls_cost         # a few requests, to check the harness

Two topologies, each started twice per round (plain, then TLS) on free loopback ports:
    aggregated      tokenizer + gateway + 1 decode worker (`tandem up`'s default below 8 cores);
                    256-token prompts, 128 tokens out, 64 at once: gateway → tokenizer and → decode hops
    disaggregated   tokenizer + gateway + 1 prefill + 1 decode, 1,024-token prompts forced through
                    prefill (--serving-mode disaggregated), 32 tokens out, Poisson 2 req/s: adds the
                    gateway → prefill hop and ReleaseKV (the UCX data plane is cleartext either way)
With `--tls` every gRPC hop is mTLS, the gateway's front door is TLS (the client verifies it with the
cluster's dev CA) and etcd is TLS with client certificates. Rounds alternate plain and TLS so that a
drift of this VM's speed during the run falls on both; the table gives each round and the ratio of
the medians. The goal (issue 14): ≤ 3% throughput and ≤ 1 ms p50 ITL overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine_load import busy_cores  # noqa: E402
from tandem.launcher import ClusterSpec, LocalCluster  # noqa: E402

TOPOLOGIES = {
    "aggregated": {
        "spec": {"num_prefill": 0, "num_decode": 1},
        "bench": ["random", "--input-len", "256", "--output-len", "128", "--num-prompts", "64", "--request-rate", "inf"],
    },
    "disaggregated": {
        "spec": {"num_prefill": 1, "num_decode": 1},
        "bench": ["random", "--input-len", "1024", "--output-len", "32", "--num-prompts", "40", "--request-rate", "2",
                  "--serving-mode", "disaggregated"],
    },
}  # fmt: skip
SMOKE = {"64": "4", "40": "4", "128": "8"}
HEADLINE = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms")


def bench_args(topology: str, smoke: bool) -> list[str]:
    args = list(TOPOLOGIES[topology]["bench"])
    return [SMOKE.get(a, a) for a in args] if smoke else args


def run_bench(cluster: LocalCluster, topology: str, tls: bool, out: Path, smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "tandem", "bench", *bench_args(topology, smoke), "--gateway", cluster.gateway_address,
           "--warmup", "4", "--seed", "0", "--out", str(out), "--label", f"{topology}-{'tls' if tls else 'plain'}", "--no-progress"]  # fmt: skip
    if tls:
        cmd += ["--tls-ca", str(cluster.workdir / "certs" / "ca.pem")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"tandem bench failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    result = json.loads((out / "result.json").read_text())
    if result.get("failed"):
        raise RuntimeError(f"{result['failed']} requests failed in {out}: {result.get('errors_by_status')}")
    return {k: result.get(k) for k in HEADLINE}


def one_run(topology: str, tls: bool, dtype: str, out: Path, smoke: bool) -> dict:
    shape = TOPOLOGIES[topology]["spec"]
    # as `tandem up` does: the workers share the cores (torch's default makes their OpenMP pools fight)
    threads = max(1, (os.cpu_count() or 1) // (shape["num_prefill"] + shape["num_decode"]))
    spec = ClusterSpec(**shape, free_ports=True, http_port=0, tls=tls, workdir=out / "cluster",
                       worker_args=["--dtype", dtype, "--threads", str(threads)])  # fmt: skip
    busy_before = busy_cores()
    with LocalCluster(spec) as cluster:
        headline = run_bench(cluster, topology, tls, out / "bench", smoke)
    return headline | {"busy_cores_before": busy_before}


def ratio(runs: list[dict], key: str) -> float | None:
    plain = [r[key] for r in runs if not r["tls"] and r.get(key) is not None]
    tls = [r[key] for r in runs if r["tls"] and r.get(key) is not None]
    if not plain or not tls:
        return None
    return statistics.median(tls) / statistics.median(plain)


def summarize(topology: str, runs: list[dict]) -> dict:
    plain_itl = statistics.median(r["median_itl_ms"] for r in runs if not r["tls"])
    tls_itl = statistics.median(r["median_itl_ms"] for r in runs if r["tls"])
    return {
        "throughput_tls_over_plain": ratio(runs, "output_throughput"),
        "ttft_p50_tls_over_plain": ratio(runs, "median_ttft_ms"),
        "itl_p50_overhead_ms": tls_itl - plain_itl,
    }


def markdown(results: dict) -> str:
    lines = ["| topology | round | TLS | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for topology, entry in results["topologies"].items():
        for r in entry["runs"]:
            lines.append(f"| {topology} | {r['round']} | {'yes' if r['tls'] else 'no'} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | "
                         f"{r['p99_ttft_ms']:.0f} | {r['median_itl_ms']:.1f} | {r['p99_itl_ms']:.1f} |")  # fmt: skip
    lines += ["", "| topology | throughput TLS / plain | TTFT p50 TLS / plain | ITL p50 overhead |", "|---|---|---|---|"]
    for topology, entry in results["topologies"].items():
        s = entry["summary"]
        lines.append(f"| {topology} | {s['throughput_tls_over_plain']:.3f} | {s['ttft_p50_tls_over_plain']:.3f} | {s['itl_p50_overhead_ms']:+.2f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where result.json, the clusters' logs and the bench runs go")
    p.add_argument("--topologies", nargs="+", choices=list(TOPOLOGIES), default=list(TOPOLOGIES))
    p.add_argument("--rounds", type=int, default=2, help="plain/TLS pairs per topology (default 2: ABAB)")
    p.add_argument("--dtype", default="bfloat16", help="the workers' dtype (default bfloat16)")
    p.add_argument("--smoke", action="store_true", help="a few requests per run: checks the harness, measures nothing")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    results = {"command": " ".join(["python -m benchmarks.tls_cost", *(argv if argv is not None else sys.argv[1:])]),
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "topologies": {}}  # fmt: skip
    for topology in args.topologies:
        runs = []
        for rnd in range(1, args.rounds + 1):
            for tls in (False, True):
                print(f"{topology} round {rnd} {'TLS' if tls else 'plain'} ...", file=sys.stderr, flush=True)
                headline = one_run(topology, tls, args.dtype, args.out / topology / f"round{rnd}-{'tls' if tls else 'plain'}", args.smoke)
                runs.append({"round": rnd, "tls": tls, **headline})
        results["topologies"][topology] = {"runs": runs, "summary": summarize(topology, runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
