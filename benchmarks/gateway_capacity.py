"""The gateway's sustained request rate: instant simulated workers, so the gateway (and the load
generator) are all that cost time.

    python -m benchmarks.gateway_capacity [--workers 8 100] [--concurrency 8 32 64] [--num-prompts 2000]

For each worker count, a SimStack (etcd, a `tandem serve gateway` process, a simulated fleet with
`--instant` timing: steps and pulls take no time, the cache, events and streams are real) is
started; for each concurrency, `tandem bench random` sends closed-loop requests (512 prompt
tokens as token ids, 16 output tokens, prefix-aware routing: every request is hashed, matched
against the index and scored over every worker). Reported: requests/s and output tokens/s the
gateway sustained, TTFT and E2E p50/p99, and the gateway process's CPU time per request (from
/proc, so what the gateway itself spends, apart from the load generator and the fleet sharing
the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from loadtest.bench_cli import main as bench

from .sim_stack import SimStack


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[8, 100])
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("results/gateway-capacity"))
    args = p.parse_args()
    rows = []
    for num_workers in args.workers:
        workdir = Path(tempfile.mkdtemp(prefix="tandem-capacity-"))
        with SimStack(workdir, num_workers, fleet_args=["--instant"]) as stack:
            for concurrency in args.concurrency:
                out = args.out / f"w{num_workers}-c{concurrency}"
                cpu0 = cpu_seconds(stack.gateway_proc.pid)
                code = bench(["random", "--gateway", stack.gateway, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                              "--max-concurrency", str(concurrency), "--num-prompts", str(args.num_prompts), "--warmup", str(concurrency * 2),
                              "--out", str(out), "--no-progress", "--no-plots", "--label", f"{num_workers} workers, c={concurrency}"])  # fmt: skip
                if code != 0:
                    raise RuntimeError(f"tandem bench failed with {code}")
                cpu = cpu_seconds(stack.gateway_proc.pid) - cpu0
                r = json.loads((out / "result.json").read_text())
                total = r["num_requests"] + r.get("num_warmup_requests", 0)
                rows.append((num_workers, concurrency, r, cpu / total))
    print(f"\n{args.input_len}-token prompts (token ids), {args.output_len} output tokens, prefix-aware routing, instant simulated workers")
    print(
        f"{'workers':>7s} {'conc':>5s} {'req/s':>7s} {'out tok/s':>10s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'E2E p50':>8s} {'E2E p99':>8s} {'gw CPU ms/req':>14s} {'failed':>6s}"
    )
    for n, c, r, cpu in rows:
        print(f"{n:7d} {c:5d} {r['request_throughput']:7.1f} {r['output_throughput']:10.0f} {r['median_ttft_ms']:9.1f} {r['p99_ttft_ms']:9.1f} "
              f"{r['median_e2el_ms']:8.1f} {r['p99_e2el_ms']:8.1f} {cpu * 1000:14.2f} {r['failed']:6d}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
