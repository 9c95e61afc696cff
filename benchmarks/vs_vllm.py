"""Tandem against vLLM on this machine, side by side, in one run: offline engines, then servers.

    python -m benchmarks.vs_vllm --out results/vs_vllm                      # everything
    python -m benchmarks.vs_vllm --parts offline burst --servers vllm tandem-default

1. offline: vLLM's `LLM.generate` (its own virtualenv, see vllm_env.py) and Tandem's on the same
   prompts (64 × 256 random token ids → 128 tokens, greedy, ignore_eos), plus batch-1 decode time;
2. served: `vllm serve` and `tandem up` in several topologies (served_targets.py), each driven by
   the same client, `tandem bench --backend openai`, on the same workloads:
     burst          the offline workload sent at once (request rate inf);
     sweep          Poisson arrivals at rising rates, past saturation (1-6 req/s by default, --rates,
                    100 requests each, so that a rate's p99 TTFT is a percentile and not its slowest
                    request);
     shared-prefix  groups of prompts sharing a 512-token system prompt (prefix caching, routing);
   and, where vLLM is installed, `vllm bench serve` on the burst workload too.
One JSON (summary.json) and one PNG (summary.png) under --out, and a Markdown table on stdout for
docs/benchmarks.md. Run it on a quiet machine: every number here collapses when another process
holds a core, and this VM's speed moves by 2x between days, so only same-run numbers compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .machine_load import busy_cores
from .served_targets import MODEL_NAME, TANDEM_TOPOLOGIES, ServedTarget, tandem_target, vllm_target
from .vllm_env import ensure_vllm

# Poisson rates up to past vLLM's and Tandem's saturation on the Zen 4 VM these were chosen on (~5
# req/s of this workload); --rates sets them for a slower machine (an Ice Lake Xeon saturates at ~1.5)
SWEEP_RATES = "1,2,3,4,6"
WORKLOADS = {
    "burst": ["random", "--input-len", "256", "--output-len", "128", "--num-prompts", "64", "--request-rate", "inf"],
    # 100 requests a rate: with the 20 s a rate this had before, 1 req/s gave 20 requests and the
    # "p99" was the slowest of them (numpy's linear percentile of 20 values sits 81% of the way to the max)
    "sweep": ["random", "--input-len", "256", "--output-len", "128", "--num-prompts", "100", "--request-rate", SWEEP_RATES],
    "shared-prefix": ["shared-prefix", "--num-groups", "4", "--prompts-per-group", "16", "--system-prompt-len", "512",
                      "--question-len", "64", "--output-len", "64", "--request-rate", "4"],
}  # fmt: skip
# --smoke: the same runs, a few requests each, to check the harness end to end in a couple of minutes
# (and a sweep's first two rates)
SMOKE = {"64": "6", "128": "16", "100": "4", "4": "2", "16": "2"}
HEADLINE = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms")


def run_json(cmd: list[str], env=None, timeout: float = 1800) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    # the last JSON object line (vLLM logs its shutdown to stdout after it)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"engine"')]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... printed no result; its output ends: {done.stdout.strip()[-1000:]}")
    return json.loads(lines[-1])


def offline(args, install, model_dir: str) -> dict:
    results = {"tandem": run_json([sys.executable, "-m", "benchmarks.tandem_offline", "--dtype", args.dtype, "--threads", str(args.threads)])}
    if install is not None:
        results["vllm"] = run_json(install.script("vllm_offline.py") + [model_dir, "--dtype", args.dtype], env=install.env(args.threads))
        results["tandem_over_vllm"] = results["tandem"]["output_tok_per_s"] / results["vllm"]["output_tok_per_s"]
    return results


def workload_args(workload: str, smoke: bool, rates: str = SWEEP_RATES) -> list[str]:
    args = list(WORKLOADS[workload])
    if workload == "sweep":
        args[args.index("--request-rate") + 1] = ",".join(rates.split(",")[:2]) if smoke else rates
    return [SMOKE.get(a, a) for a in args] if smoke else args


def bench(target: ServedTarget, workload: str, out: Path, smoke: bool, rates: str = SWEEP_RATES) -> dict:
    run_dir = out / target.label / workload
    cmd = [sys.executable, "-m", "tandem", "bench", *workload_args(workload, smoke, rates), "--backend", "openai", "--base-url", target.base_url,
           "--model", MODEL_NAME, "--warmup", "4", "--seed", "0", "--out", str(run_dir), "--label", target.label, "--no-progress",
           "--vocab-size", "49152"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-1500:]}
    return json.loads((run_dir / "result.json").read_text())


def vllm_bench_serve(install, target: ServedTarget, out: Path, model_dir: str) -> dict:
    """vLLM's own client on the burst workload, against any of the servers."""
    result_dir = out / target.label / "vllm-bench-serve"
    cmd = install.script("vllm_cli.py") + [
        "bench", "serve", "--backend", "vllm", "--base-url", target.base_url.removesuffix("/v1"), "--model", MODEL_NAME,
        "--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
        "--num-prompts", "64", "--request-rate", "inf", "--ignore-eos", "--seed", "0", "--save-result",
        "--result-dir", str(result_dir), "--result-filename", "result.json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=install.env(), timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip()[-1500:]}
    return json.loads((result_dir / "result.json").read_text())


def headline(result: dict) -> dict:
    if "runs" in result:  # a sweep: one row per rate
        return {"points": [dict(rate=r.get("request_rate"), **{k: r.get(k) for k in HEADLINE}) for r in result["runs"]]}
    return {k: result.get(k) for k in HEADLINE if k in result} | ({"failed": result["failed"]} if result.get("failed") else {})


def served(args, install, model_dir: str, out: Path) -> dict:
    results: dict[str, dict] = {}
    for i, label in enumerate(args.servers):
        if label == "vllm" and install is None:
            continue
        port = args.http_port + i
        target = (vllm_target(install, model_dir, args.dtype, port, args.threads) if label == "vllm"
                  else tandem_target(label, args.dtype, port, args.base_port + 20 * i, out / "logs"))  # fmt: skip
        print(f"[{time.strftime('%H:%M:%S')}] starting {label} ...", flush=True)
        target.start(out / "logs")
        try:
            for workload in args.parts:
                if workload == "offline":
                    continue
                print(f"[{time.strftime('%H:%M:%S')}]   {label}: {workload}", flush=True)
                results.setdefault(label, {})[workload] = headline(bench(target, workload, out, args.smoke, args.rates))
            if install is not None and "burst" in args.parts and args.vllm_client:
                results[label]["burst-vllm-client"] = headline(vllm_bench_serve(install, target, out, model_dir))
        finally:
            target.stop()
    return results


def headline_cells(r: dict) -> str:
    """A result's HEADLINE figures as Markdown cells, a dash for one it lacks."""
    return " | ".join("—" if r.get(k) is None else f"{r[k]:.0f}" for k in HEADLINE)


def markdown(summary: dict) -> str:
    lines = []
    off = summary.get("offline")
    if off:
        lines += ["| offline, 64 × 256 → 128 | output tok/s | wall s | machine CPU s | batch-1 ms/token |", "|---|---|---|---|---|"]
        for name in ("vllm", "tandem"):
            if name in off:
                r = off[name]
                lines.append(
                    f"| {name} `LLM.generate` | {r['output_tok_per_s']:.0f} | {r['wall_s']:.1f} | {r['machine_cpu_s']:.1f} | {r['batch1_decode_ms_per_token']:.1f} |"
                )
        lines.append("")
    for workload in ("burst", "burst-vllm-client", "shared-prefix"):
        rows = [(label, r[workload]) for label, r in summary.get("served", {}).items() if workload in r]
        if not rows:
            continue
        lines += [f"| {workload} | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {label} | {headline_cells(r)} |" for label, r in rows]
        lines.append("")
    sweeps = {label: {pt["rate"]: pt for pt in r["sweep"].get("points", [])} for label, r in summary.get("served", {}).items() if "sweep" in r}
    if sweeps:
        lines += ["| sweep | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms |", "|---|---|---|---|---|---|---|"]
        for rate in sorted({rate for points in sweeps.values() for rate in points if rate is not None}):
            for label, points in sweeps.items():
                if rate in points:
                    lines.append(f"| {label} | {rate:g} | {headline_cells(points[rate])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/vs_vllm")
    ap.add_argument("--parts", nargs="+", default=["offline", "burst", "sweep", "shared-prefix"], choices=["offline", *WORKLOADS])
    ap.add_argument("--servers", nargs="+", default=["vllm", *TANDEM_TOPOLOGIES], choices=["vllm", *TANDEM_TOPOLOGIES])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rates", default=SWEEP_RATES, help="the sweep's request rates, req/s, comma-separated (past saturation)")
    ap.add_argument("--threads", type=int, default=2, help="cores each engine may use (offline, and vLLM's OpenMP binding)")
    ap.add_argument("--http-port", type=int, default=18000)
    # below Linux's ephemeral port range (32768-60999): the client's connections to the server before
    # leave their local ports in TIME-WAIT, and a Tandem started next on 51050 and up failed to bind
    # its tokenizer's metrics port to one of them
    ap.add_argument("--base-port", type=int, default=21050, help="Tandem's first service port (below the ephemeral range)")
    ap.add_argument("--no-install-vllm", action="store_true", help="use an existing vLLM virtualenv only; never create one")
    ap.add_argument("--smoke", action="store_true", help="a few requests per run: checks the harness, measures nothing")
    ap.add_argument("--vllm-client", action="store_true", help="also run `vllm bench serve` on the burst workload against every server")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    busy = busy_cores()
    if busy > 0.3:
        print(f"warning: {busy:.1f} cores are busy before the run; the numbers will not be comparable", flush=True)
    install = ensure_vllm(create=not args.no_install_vllm)
    from services.model_files.model_dir import resolve_model_dir

    model_dir = str(resolve_model_dir("default"))
    summary = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "busy_cores_before": busy,
               "dtype": args.dtype, "vllm": str(install.python) if install else None}  # fmt: skip
    if "offline" in args.parts:
        print(f"[{time.strftime('%H:%M:%S')}] offline engines ...", flush=True)
        summary["offline"] = offline(args, install, model_dir)
    if any(p != "offline" for p in args.parts):
        summary["served"] = served(args, install, model_dir, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from .vs_vllm_plot import plot_summary

    plot_summary(summary, out / "summary.png")
    print(markdown(summary))


if __name__ == "__main__":
    main()
