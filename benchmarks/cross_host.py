"""Tandem across hosts vs on one host, in one run, on the network-namespace test bed.

    sudo .venv/bin/python -m benchmarks.cross_host                 # the full run (minutes; a quiet machine)
    sudo .venv/bin/python -m benchmarks.cross_host --smoke         # everything tiny (a minute or two)

Every "host" is a network namespace joined by a bridge (tests/helpers/netns.py; needs root); the
one-host runs are in a namespace of their own too, on its loopback, so nothing collides with
services already running on this machine.

  kv        the KV transfer microbenchmark (as benchmarks/kv_transfer.py's ucx path: KVTransportServer
            → KVTransportClient.pull of scattered blocks of the default model's layout): two
            processes on two hosts (UCX over TCP on eth0, as between machines; tests/integration/
            test_multi_host.py says why shared memory cannot cross namespaces) beside two processes
            on one host (UCX's shared memory and CMA)
  pd        `tandem bench random` disaggregated (1 prefill + 1 decode worker), long prompts so the
            gateway disaggregates: prefill and decode (and etcd, tokenizer, gateway, the client) on
            hosts of their own, beside all of them on one host's loopback
  fleet     `tandem bench random` through the gateway to 2 hosts of decode workers (aggregated)

Writes docs/results/cross_host.json (--out; --smoke: beside the logs) and prints a Markdown table. The namespaces and every
process in them are removed on exit, on an error and on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UCX_ACROSS_HOSTS = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}
ETCD_PORT = 2379


# ---- kv: one process of the pair (run inside a namespace; talks to its peer over a socketpair) ----


def kv_peer(args) -> None:
    import asyncio

    import torch

    from kvtransfer.ucx_transport import KVTransportClient, KVTransportServer

    torch.set_num_threads(1)
    layers, kv_heads, block, head_dim = 30, 3, 16, 64  # SmolLM2-135M, fp32: 720 KiB a block
    cache = torch.randn(args.blocks, layers, 2, kv_heads, block, head_dim, generator=torch.Generator().manual_seed(1))  # block-major, as the engine's
    link = socket.socket(fileno=args.fd)
    stream = link.makefile("rw")

    def send(**msg) -> None:
        stream.write(json.dumps(msg) + "\n")
        stream.flush()

    def recv() -> dict:
        return json.loads(stream.readline())

    async def server() -> None:
        ucx = KVTransportServer(cache)
        await ucx.start()
        send(address=ucx.address.hex())
        while (msg := await asyncio.to_thread(recv)).get("op") == "expose":
            ucx.expose(bytes.fromhex(msg["token"]), msg["ids"], time.time() + 60, peer_address=bytes.fromhex(msg["peer"]))
            send(ok=True)
        await ucx.close()

    async def client() -> None:
        ucx = KVTransportClient(cache)
        await ucx.start()
        address = bytes.fromhex(recv()["address"])
        results, n_token = {}, 0
        for n in args.sizes:
            src, dst = [(3 + 7 * i) % args.blocks for i in range(n)], [(500 + 7 * i) % args.blocks for i in range(n)]
            times = []
            for _ in range(args.reps + 1):  # the first is a warm-up (endpoint set-up)
                n_token += 1
                token = n_token.to_bytes(16, "little")
                send(op="expose", token=token.hex(), ids=src, peer=ucx.address.hex())
                recv()
                t = time.perf_counter()
                await ucx.pull(address, token, src, dst, timeout=120)
                times.append(time.perf_counter() - t)
            seconds = statistics.median(times[1:])
            nbytes = n * layers * 2 * kv_heads * block * head_dim * 4
            results[str(n)] = {"blocks": n, "bytes": nbytes, "seconds": seconds, "GBps": nbytes / seconds / 1e9}
        send(op="stop")
        await ucx.close()
        print(json.dumps(results), flush=True)

    asyncio.run(server() if args.role == "server" else client())


def run_kv(bed, hosts: tuple[str, str], env: dict[str, str], args, logs: Path) -> dict:
    """The server on hosts[0], the client on hosts[1]; the client's JSON results."""
    a, b = socket.socketpair()
    common = ["--blocks", str(args.kv_blocks), "--reps", str(args.reps), "--sizes", *map(str, args.kv_sizes)]
    procs = []
    try:
        for host, role, sock in ((hosts[0], "server", a), (hosts[1], "client", b)):
            cmd = bed.command(host, [sys.executable, "-m", "benchmarks.cross_host", "kv-peer", "--role", role, "--fd", str(sock.fileno()), *common])
            with open(logs / f"kv-{role}-{hosts[0]}-{hosts[1]}.log", "ab") as log:
                procs.append(
                    subprocess.Popen(cmd, pass_fds=[sock.fileno()], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=log, text=True)
                )
        a.close(), b.close()
        out, _ = procs[1].communicate(timeout=600)
        procs[0].wait(timeout=30)
        if procs[1].returncode != 0 or not out.strip():
            raise RuntimeError(f"the KV client failed ({procs[1].returncode}); see {logs}")
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---- pd / fleet: services placed on hosts, then `tandem bench` from the client host ----------------


class Cluster:
    """Processes started inside the bed; stop() ends them (the bed kills stragglers on close)."""

    def __init__(self, bed, logs: Path):
        self.bed, self.logs, self.procs = bed, logs, []

    def start(self, host: str, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        from tandem.processes import popen_child

        self.procs.append(popen_child(self.bed.command(host, argv), self.logs / f"{name}.log", env))

    def stop(self) -> None:
        from tandem.processes import stop_child

        for proc in reversed(self.procs):
            stop_child(proc, 10)
        self.procs.clear()


def start_cluster(bed, placement: list[tuple[str, str, str]], one_host: bool, args, logs: Path) -> tuple[Cluster, dict[str, tuple[str, str]]]:
    """placement: (name, host, role) with role etcd | tokenizer | prefill | decode | gateway.
    Returns the cluster and {name: (gRPC address, metrics address)} once every service answers health."""
    from services.common.config import DEFAULT_GRPC_PORTS, DEFAULT_METRICS_PORTS
    from tandem.etcd_process import find_etcd
    from tests.helpers.netns_client import NetnsClient
    from tests.helpers.waiting import wait_for

    cluster, addresses = Cluster(bed, logs), {}
    etcd_host = next(host for _, host, role in placement if role == "etcd")
    etcd_ip = "127.0.0.1" if one_host else bed.address(etcd_host)
    for i, (name, host, role) in enumerate(placement):
        ip = "127.0.0.1" if one_host else bed.address(host)
        if role == "etcd":
            cluster.start(host, name, [find_etcd(), "--name", name, "--data-dir", str(logs / f"{name}-data"), "--log-level", "warn",
                                       "--listen-client-urls", f"http://{ip}:{ETCD_PORT}", "--advertise-client-urls", f"http://{ip}:{ETCD_PORT}",
                                       "--listen-peer-urls", f"http://{ip}:2380", "--initial-advertise-peer-urls", f"http://{ip}:2380",
                                       "--initial-cluster", f"{name}=http://{ip}:2380"])  # fmt: skip
            continue
        # on one host, two services of a role need ports of their own
        port, metrics = DEFAULT_GRPC_PORTS[role] + 100 * i * one_host, DEFAULT_METRICS_PORTS[role] + 100 * i * one_host
        argv = [sys.executable, "-m", "tandem", "serve", role, "--host", ip, "--port", str(port), "--metrics-port", str(metrics),
                "--etcd", f"{etcd_ip}:{ETCD_PORT}", "--worker-id", name]  # fmt: skip
        if role != "gateway":
            argv += ["--model", "default"]
        if role in ("prefill", "decode"):
            argv += ["--threads", "1", "--kv-cache-gb", str(args.kv_cache_gb)]
        if role == "gateway":
            argv += ["--http-port", "0", "--disagg-min-uncached-tokens", str(args.input_len // 2)]
        cluster.start(host, name, argv, {} if one_host else UCX_ACROSS_HOSTS)
        addresses[name] = (f"{ip}:{port}", f"{ip}:{metrics}")
    client_host = "local" if one_host else "client"
    client = NetnsClient(bed, client_host, logs / f"health-{client_host}.log")
    try:
        for name, (address, _) in addresses.items():
            wait_for(lambda address=address: client.call("health", address=address, timeout=2).get("serving"), f"{name} at {address} (log {logs / name}.log)",
                     timeout=300, interval=1)  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    finally:
        client.close()
    return cluster, addresses


def run_bench(bed, client_host: str, gateway: str, mode: str, label: str, args, logs: Path) -> dict:
    out = logs / f"bench-{label}"
    argv = [sys.executable, "-m", "tandem", "bench", "random", "--gateway", gateway, "--serving-mode", mode,
            "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.concurrency), "--warmup", str(args.warmup), "--seed", "1", "--label", label,
            "--out", str(out), "--no-plots", "--no-progress", "--no-details"]  # fmt: skip
    result = bed.run(client_host, argv, timeout=3600)
    (logs / f"bench-{label}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"tandem bench {label} failed ({result.returncode}); see {logs / f'bench-{label}.log'}")
    r = json.loads((out / "result.json").read_text())
    keys = ("completed", "failed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "duration")
    return {k: r.get(k) for k in keys}


def kv_pulls(bed, host: str, metrics_addresses: list[str], logs: Path) -> int:
    """KV pulls the decode workers made (tandem_kv_pull_seconds_count), read from inside `host`."""
    from tests.helpers.netns_client import NetnsClient

    client = NetnsClient(bed, host, logs / "metrics-client.log")
    try:
        return int(sum(client.call("metric", address=a, name="tandem_kv_pull_seconds_count", timeout=10)["value"] for a in metrics_addresses))
    finally:
        client.close()


def run_clusters(bed, args, logs: Path) -> dict:
    layouts = {
        "pd-one-host": ("disaggregated", True, [("etcd", "local", "etcd"), ("tokenizer", "local", "tokenizer"), ("prefill", "local", "prefill"),
                                                ("decode", "local", "decode"), ("gateway", "local", "gateway")]),
        "pd-cross-host": ("disaggregated", False, [("etcd", "etcd", "etcd"), ("tokenizer", "tokenizer", "tokenizer"), ("prefill", "prefill", "prefill"),
                                                   ("decode", "decode-a", "decode"), ("gateway", "gateway", "gateway")]),
        "fleet-2-decode-hosts": ("aggregated", False, [("etcd", "etcd", "etcd"), ("tokenizer", "tokenizer", "tokenizer"), ("decode-a", "decode-a", "decode"),
                                                       ("decode-b", "decode-b", "decode"), ("gateway", "gateway", "gateway")]),
    }  # fmt: skip
    results = {}
    for label, (mode, one_host, placement) in layouts.items():
        print(f"-- {label}: starting {', '.join(n for n, _, _ in placement)}", flush=True)
        layout_logs = logs / label  # etcd's data directory too: each layout starts from an empty etcd
        layout_logs.mkdir()
        cluster, addresses = start_cluster(bed, placement, one_host, args, layout_logs)
        client_host = "local" if one_host else "client"
        try:
            # auto mode: the long prompts make the gateway disaggregate (pd) on its own
            results[label] = run_bench(bed, client_host, addresses["gateway"][0], "auto" if mode == "disaggregated" else mode, label, args, layout_logs)
            results[label]["kv_pulls"] = kv_pulls(bed, client_host, [m for n, (_, m) in addresses.items() if n.startswith("decode")], layout_logs)
            if mode == "disaggregated" and not results[label]["kv_pulls"]:
                raise RuntimeError(f"{label}: no request was disaggregated (no KV pull on the decode worker): the comparison would be void")
        finally:
            cluster.stop()
    return results


def markdown(record: dict) -> str:
    lines = ["| KV pull (blocks) | MB | one host GB/s | across hosts GB/s |", "|---|---|---|---|"]
    for n, local in record["kv"]["one-host"].items():
        cross = record["kv"]["cross-host"][n]
        lines.append(f"| {n} | {local['bytes'] / 1e6:.1f} | {local['GBps']:.2f} | {cross['GBps']:.2f} |")
    lines += ["", "| bench | completed | KV pulls | output tok/s | TTFT median ms | TTFT p99 ms | TPOT median ms |", "|---|---|---|---|---|---|---|"]
    for label, r in record["bench"].items():
        cells = [r.get("completed"), r.get("kv_pulls"), r.get("output_throughput"), r.get("median_ttft_ms"), r.get("p99_ttft_ms"), r.get("median_tpot_ms")]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, through the bed's cleanup (the namespaces and their processes)."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    peer = sub.add_parser("kv-peer", help="(internal) one process of the KV pair")
    peer.add_argument("--role", choices=("server", "client"), required=True)
    peer.add_argument("--fd", type=int, required=True)
    peer.add_argument("--blocks", type=int, required=True)
    peer.add_argument("--reps", type=int, required=True)
    peer.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--smoke", action="store_true", help="everything tiny: checks the harness, measures nothing")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "cross_host.json"))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.command == "kv-peer":
        return kv_peer(args)
    if args.smoke:
        args.kv_sizes, args.kv_blocks, args.reps = [4, 16], 64, 1
        args.input_len, args.output_len, args.num_prompts, args.concurrency, args.warmup, args.kv_cache_gb = 128, 4, 2, 1, 0, 0.1
        if args.out == parser.get_default("out"):
            args.out = None  # beside the logs: a smoke run measures nothing worth keeping
    else:
        args.kv_sizes, args.kv_blocks = [64, 256, 1024], 1100  # 1k, 4k, 16k tokens
        args.input_len, args.output_len, args.num_prompts, args.concurrency, args.warmup, args.kv_cache_gb = 1024, 32, 32, 4, 2, 0.5

    from tests.helpers.netns import NetnsBed, unavailable_reason

    if (why := unavailable_reason()) is not None:
        raise SystemExit(f"cross_host needs the network-namespace test bed: {why}")
    signal.signal(signal.SIGTERM, _interrupt)
    logs = Path(tempfile.mkdtemp(prefix="tandem-cross-host-"))
    args.out = args.out or str(logs / "cross_host_smoke.json")
    print(f"logs: {logs}", flush=True)
    cpu0, t0 = os.times(), time.monotonic()
    with NetnsBed(["local", "etcd", "tokenizer", "prefill", "decode-a", "decode-b", "gateway", "client"]) as bed:
        kv = {"one-host": run_kv(bed, ("local", "local"), {}, args, logs),
              "cross-host": run_kv(bed, ("prefill", "decode-a"), UCX_ACROSS_HOSTS, args, logs)}  # fmt: skip
        bench = run_clusters(bed, args, logs)
    cpu1 = os.times()
    record = {
        "smoke": args.smoke, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workload": {k: getattr(args, k) for k in ("input_len", "output_len", "num_prompts", "concurrency", "kv_sizes", "reps")},
        "wall_s": time.monotonic() - t0, "cpu_s_children": (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system),
        "kv": kv, "bench": bench,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the test bed's namespaces and processes were removed", file=sys.stderr)
        raise SystemExit(130) from None
