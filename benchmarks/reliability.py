"""Reliability under faults and over time: what a client sees when parts of Tandem die, and whether
anything grows without bound (issue 13, item 7).

    python benchmarks/reliability.py --out rel/                       # faults, then a 10-minute soak
    python benchmarks/reliability.py --soak-seconds 60 --fault-seconds 20 --out rel/   # a short run

A supervised cluster (what `tandem up` runs: a prefill and two decode workers, the default model)
on free loopback ports. Each fault is injected under a steady `tandem bench` load and reported as
requests sent / failed / hung (deadline or cut off at the end) and the time to recover:
    decode     SIGKILL decode-1: recovered when the launcher's restart is back in the gateway's routing
    prefill    SIGKILL prefill-0 (prompts are long enough to be disaggregated): the same
    etcd-stop  SIGSTOP etcd for 10 s, then SIGCONT: recovered when every service is registered again
    etcd-kill  SIGKILL etcd (the launcher restarts it with its data): the same
Then the soak: a moderate load for --soak-seconds while every process's RSS and open descriptors
(/proc) and the workers' KV usage (Worker.GetLoad) are sampled; at the end the workers must
return to 0 used KV blocks when idle, and the RSS / descriptor slopes after warm-up are reported.
Writes result.json and soak.png under --out, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from benchmarks.bench_load import BenchLoad  # noqa: E402
from benchmarks.cluster_probes import back_in_routing, registered_workers, routed_workers  # noqa: E402
from protos.tandem.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402
from tandem.launcher import ClusterSpec, LocalCluster  # noqa: E402

FAULTS = ("decode", "prefill", "etcd-stop", "etcd-kill")
HUNG = ("DEADLINE_EXCEEDED", "CANCELLED")  # no answer within the request deadline, or cut off at the end of the run


def outcome(result: dict) -> dict:
    by_status = result.get("errors_by_status") or {}
    hung = sum(n for status, n in by_status.items() if status in HUNG)
    return {"sent": result["completed"] + result["failed"], "failed": result["failed"] - hung, "hung": hung, "errors_by_status": by_status}


def wait_until(probe, timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until probe() was true, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if probe():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def everyone_registered(cluster: LocalCluster) -> bool:
    return {s.name for s in cluster.services} <= set(registered_workers(cluster.etcd_endpoint))


def inject(cluster: LocalCluster, fault: str, timeout: float) -> float | None:
    """Inject `fault`; returns the seconds from the fault until the cluster had recovered (None: not in `timeout`)."""
    if fault in ("decode", "prefill"):
        name = f"{fault}-1" if fault == "decode" else "prefill-0"
        old = routed_workers(cluster.gateway_address, fault)[name].registration.started_unix_ms
        cluster.service(name).proc.send_signal(signal.SIGKILL)
        return wait_until(lambda: back_in_routing(cluster.gateway_address, cluster.etcd_endpoint, name, fault, old), timeout)
    etcd = cluster.etcd
    t0 = time.monotonic()
    if fault == "etcd-stop":
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        time.sleep(10)
        os.kill(etcd.proc.pid, signal.SIGCONT)
    else:
        etcd.proc.kill()
    if wait_until(lambda: everyone_registered(cluster), timeout) is None:
        return None
    return time.monotonic() - t0  # from the fault itself, the 10 s freeze included


def run_fault(cluster: LocalCluster, fault: str, args, out: Path) -> dict:
    lead = min(5.0, args.fault_seconds / 4)  # the load is flowing before the fault
    with BenchLoad(cluster.gateway_address, out / f"fault-{fault}", args.fault_seconds, args.rate, args.input_len, args.output_len,
                   request_timeout=args.request_timeout) as load:  # fmt: skip
        time.sleep(lead)
        recovery = inject(cluster, fault, timeout=max(30.0, args.fault_seconds))
        result = load.result()
    row = {"fault": fault, **outcome(result), "recovery_s": None if recovery is None else round(recovery, 2)}
    print(f"  {fault}: {row}", file=sys.stderr, flush=True)
    return row


# ---- the soak ------------------------------------------------------------------------------------


def proc_stats(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open descriptors) of a live process, from /proc."""
    try:
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


def kv_used(cluster: LocalCluster) -> dict[str, int]:
    """worker → KV blocks in use (referenced by requests), from Worker.GetLoad."""
    used = {}
    for svc in cluster.services:
        if svc.role in ("prefill", "decode"):
            with grpc.insecure_channel(svc.address) as ch:
                try:
                    used[svc.name] = worker_pb2_grpc.WorkerStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5).num_used_blocks
                except grpc.RpcError:
                    used[svc.name] = -1
    return used


def sample(cluster: LocalCluster, t0: float) -> dict:
    procs = {s.name: s.proc.pid for s in cluster.services}
    if cluster.etcd is not None and cluster.etcd.proc is not None:
        procs["etcd"] = cluster.etcd.proc.pid
    stats = {name: proc_stats(pid) for name, pid in procs.items()}
    return {"t": round(time.monotonic() - t0, 1), "rss_mib": {n: round(s[0], 1) for n, s in stats.items() if s},
            "fds": {n: s[1] for n, s in stats.items() if s}, "kv_used_blocks": kv_used(cluster)}  # fmt: skip


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if var == 0 else 60 * sum((p[0] - mx) * (p[1] - my) for p in points) / var


def run_soak(cluster: LocalCluster, args, out: Path) -> dict:
    samples = []
    t0 = time.monotonic()
    with BenchLoad(cluster.gateway_address, out / "soak", args.soak_seconds, args.soak_rate, args.input_len, args.output_len,
                   request_timeout=args.request_timeout) as load:  # fmt: skip
        while load.proc.poll() is None:
            samples.append(sample(cluster, t0))
            time.sleep(args.sample_interval)
        result = load.result()
    # idle: every request finished, so no KV block may stay referenced (cached blocks are free)
    idle_after = wait_until(lambda: all(n == 0 for n in kv_used(cluster).values()), timeout=30, interval=0.5)
    samples.append(sample(cluster, t0))
    warm = [s for s in samples if s["t"] >= args.warmup_fraction * args.soak_seconds]
    trends = {}
    for name in samples[-1]["rss_mib"]:
        rss = [(s["t"], s["rss_mib"][name]) for s in warm if name in s["rss_mib"]]
        fds = [(s["t"], s["fds"][name]) for s in warm if name in s["fds"]]
        trends[name] = {"rss_mib_start": rss[0][1] if rss else None, "rss_mib_end": rss[-1][1] if rss else None,
                        "rss_mib_per_min": round(slope_per_minute(rss), 3), "fds_start": fds[0][1] if fds else None,
                        "fds_end": fds[-1][1] if fds else None, "fds_per_min": round(slope_per_minute(fds), 3)}  # fmt: skip
    return {"load": outcome(result), "seconds": args.soak_seconds, "rate": args.soak_rate, "kv_idle_after_s": idle_after,
            "kv_used_at_end": samples[-1]["kv_used_blocks"], "trends_after_warmup": trends, "samples": samples}  # fmt: skip


def plot_soak(soak: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = soak["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name in samples[-1]["rss_mib"]:
        ts = [s["t"] for s in samples if name in s["rss_mib"]]
        axes[0].plot(ts, [s["rss_mib"][name] for s in samples if name in s["rss_mib"]], label=name)
        axes[1].plot(ts, [s["fds"][name] for s in samples if name in s["fds"]], label=name)
    for name in samples[-1]["kv_used_blocks"]:
        axes[2].plot([s["t"] for s in samples], [s["kv_used_blocks"].get(name, 0) for s in samples], label=name)
    for ax, label in zip(axes, ("RSS (MiB)", "open descriptors", "KV blocks in use")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    axes[2].legend(fontsize=7)
    axes[2].set_xlabel("seconds into the soak")
    fig.suptitle(f"soak: {soak['seconds']:.0f}s at {soak['rate']} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tables(report: dict) -> None:
    print(f"{'fault':<10} {'sent':>6} {'failed':>7} {'hung':>5} {'recovery (s)':>13}")
    for row in report["faults"]:
        rec = "—" if row["recovery_s"] is None else f"{row['recovery_s']:.1f}"
        print(f"{row['fault']:<10} {row['sent']:>6} {row['failed']:>7} {row['hung']:>5} {rec:>13}")
    soak = report.get("soak")
    if soak:
        load = soak["load"]
        idle = "never (in 30 s)" if soak["kv_idle_after_s"] is None else f"{soak['kv_idle_after_s']:.1f}s after the load"
        print(f"\nsoak {soak['seconds']:.0f}s at {soak['rate']} req/s: {load['sent']} sent, {load['failed']} failed, {load['hung']} hung; "
              f"KV back to 0 used blocks: {idle}")  # fmt: skip
        print(f"{'process':<11} {'RSS MiB':>15} {'MiB/min':>8} {'fds':>9} {'fds/min':>8}")
        for name, t in soak["trends_after_warmup"].items():
            print(f"{name:<11} {t['rss_mib_start']:>7.0f}→{t['rss_mib_end']:<7.0f} {t['rss_mib_per_min']:>8.2f} "
                  f"{t['fds_start']:>4}→{t['fds_end']:<4} {t['fds_per_min']:>8.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model every worker serves (default: the embedded SmolLM2-135M)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"which faults, comma-separated ({','.join(FAULTS)}; '' = none)")
    p.add_argument("--fault-seconds", type=float, default=30.0, help="length of the load run around each fault (default 30)")
    p.add_argument("--rate", type=float, default=2.0, help="requests/s during the faults (default 2)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128: disaggregated, see --disagg-min-uncached-tokens)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (default 64)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="a request unanswered this long counts as hung (default 60)")
    p.add_argument("--disagg-min-uncached-tokens", type=int, default=64, help="the gateway's threshold (default 64, below --input-len)")
    p.add_argument("--soak-seconds", type=float, default=600.0, help="length of the soak (default 600; 0 = no soak)")
    p.add_argument("--soak-rate", type=float, default=1.0, help="requests/s during the soak (default 1)")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between soak samples (default 5)")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="share of the soak left out of the slopes (default 0.2)")
    p.add_argument("--out", type=Path, default=None, help="where result.json, soak.png and the bench runs go (default: a temp dir)")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"--faults: unknown {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="tandem-reliability-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec(model=args.model, num_prefill=1, num_decode=2, free_ports=True, restart=True, workdir=out / "cluster",
                       worker_args=["--threads", "1", "--kv-cache-gb", "0.25"],
                       role_args={"gateway": ["--disagg-min-uncached-tokens", str(args.disagg_min_uncached_tokens)]})  # fmt: skip
    logging.getLogger("tandem.supervisor").addHandler(logging.NullHandler())  # printed by on_event instead
    cluster = LocalCluster(spec, on_event=lambda e: print(f"  supervisor: {e.message}", file=sys.stderr, flush=True))
    print(f"starting a supervised cluster (logs in {spec.workdir}) ...", file=sys.stderr, flush=True)
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model, "faults": [], "soak": None}
    with cluster:
        wait_until(lambda: len(routed_workers(cluster.gateway_address)) == 2 and "prefill-0" in routed_workers(cluster.gateway_address, "prefill"), 60)
        for fault in faults:
            print(f"fault {fault} under {args.rate} req/s for {args.fault_seconds:.0f}s ...", file=sys.stderr, flush=True)
            report["faults"].append(run_fault(cluster, fault, args, out))
            wait_until(lambda: everyone_registered(cluster), 30)
        report["restarts"] = {s.name: cluster.restarts(s.name) for s in cluster.services} | {"etcd": cluster.restarts("etcd")}
        if args.soak_seconds > 0:
            print(f"soak: {args.soak_seconds:.0f}s at {args.soak_rate} req/s ...", file=sys.stderr, flush=True)
            report["soak"] = run_soak(cluster, args, out)
    (out / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    plot = plot_soak(report["soak"], out / "soak.png") if report["soak"] else None
    print_tables(report)
    print(f"\nwrote {out / 'result.json'}" + (f", {plot}" if plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
