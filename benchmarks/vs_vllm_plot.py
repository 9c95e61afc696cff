"""The side-by-side benchmark's one picture: throughput and latency per server, and the rate sweep."""

from __future__ import annotations

from pathlib import Path


def plot_summary(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = summary.get("served", {})
    labels = [label for label, r in served.items() if "burst" in r and "output_throughput" in r["burst"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    if summary.get("offline"):
        off = summary["offline"]
        names = [n for n in ("vllm", "tandem") if n in off]
        axes[0].bar([f"{n}\noffline" for n in names], [off[n]["output_tok_per_s"] for n in names], color="#999999")
    axes[0].bar(labels, [served[label]["burst"]["output_throughput"] for label in labels], color="#4477aa")
    axes[0].set_title("output tok/s, 64 × (256 → 128) at once")
    axes[0].tick_params(axis="x", rotation=30)
    width = 0.4
    xs = range(len(labels))
    axes[1].bar([x - width / 2 for x in xs], [served[label]["burst"].get("median_ttft_ms", 0) for label in labels], width, label="TTFT p50")
    axes[1].bar([x + width / 2 for x in xs], [served[label]["burst"].get("median_tpot_ms", 0) * 10 for label in labels], width, label="TPOT p50 × 10")
    axes[1].set_xticks(list(xs), labels, rotation=30)
    axes[1].set_title("latency (ms), same run")
    axes[1].legend()
    for label, r in served.items():
        points = r.get("sweep", {}).get("points") or []
        pts = [(p["rate"], p["p99_ttft_ms"]) for p in points if p.get("rate") is not None and p.get("p99_ttft_ms") is not None]
        if pts:
            axes[2].plot(*zip(*sorted(pts)), marker="o", label=label)
    axes[2].set_xlabel("request rate (req/s, Poisson)")
    axes[2].set_ylabel("TTFT p99 (ms)")
    axes[2].set_yscale("log")
    axes[2].set_title("rate sweep")
    if axes[2].lines:
        axes[2].legend()
    fig.suptitle(f"Tandem vs vLLM, {summary.get('dtype')}, {summary.get('date')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
