"""The side-by-side benchmark's one picture: throughput and latency per server, and the rate sweep.
Only the panels the run has data for: a sweep-only run draws the sweep alone, a burst-only run no sweep."""

from __future__ import annotations

from pathlib import Path


def plot_summary(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = summary.get("served", {})
    offline = summary.get("offline") or {}
    labels = [label for label, r in served.items() if "burst" in r and "output_throughput" in r["burst"]]
    sweeps = {}
    for label, r in served.items():
        points = r.get("sweep", {}).get("points") or []
        pts = [(p["rate"], p["p99_ttft_ms"]) for p in points if p.get("rate") is not None and p.get("p99_ttft_ms") is not None]
        if pts:
            sweeps[label] = sorted(pts)
    offline_names = [n for n in ("vllm", "tandem") if n in offline]
    panels = (["throughput"] if labels or offline_names else []) + (["latency"] if labels else []) + (["sweep"] if sweeps else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    if "throughput" in ax:
        a = ax["throughput"]
        a.bar([f"{n}\noffline" for n in offline_names], [offline[n]["output_tok_per_s"] for n in offline_names], color="#999999")
        a.bar(labels, [served[label]["burst"]["output_throughput"] for label in labels], color="#4477aa")
        a.set_title("output tok/s, 64 × (256 → 128) at once")
        a.tick_params(axis="x", rotation=30)
    if "latency" in ax:
        a, width, xs = ax["latency"], 0.4, range(len(labels))
        a.bar([x - width / 2 for x in xs], [served[label]["burst"].get("median_ttft_ms", 0) for label in labels], width, label="TTFT p50")
        a.bar([x + width / 2 for x in xs], [served[label]["burst"].get("median_tpot_ms", 0) * 10 for label in labels], width, label="TPOT p50 × 10")
        a.set_xticks(list(xs), labels, rotation=30)
        a.set_title("latency (ms), same run")
        a.legend()
    if "sweep" in ax:
        a = ax["sweep"]
        for label, pts in sweeps.items():
            a.plot(*zip(*pts), marker="o", label=label)
        a.set_xlabel("request rate (req/s, Poisson)")
        a.set_ylabel("TTFT p99 (ms)")
        a.set_yscale("log")
        a.set_title("rate sweep")
        a.legend()
    fig.suptitle(f"Tandem vs vLLM, {summary.get('dtype')}, {summary.get('date')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
