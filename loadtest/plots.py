"""PNG plots of results (matplotlib, Agg backend: no display needed). Each takes one or several
labelled results, so a single run and a comparison draw the same figure.

    latency_cdf.png   TTFT, TPOT, ITL and E2EL as empirical CDFs: the x where a curve reaches 0.5
                      is the median, 0.99 the p99; a curve further left is faster, a long flat tail
                      is a few slow requests (queueing, preemption, a cold cache)
    sweep.png         against the offered load (request rate or concurrency): achieved request and
                      output token throughput (they stop following the load at saturation), the
                      share of failed requests, and TTFT, TPOT and E2EL medians (solid) and p99s
                      (dashed), which climb steeply past saturation
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .result import as_float

_CDF_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT (excl. 1st token)"), ("itl", "ITL"), ("e2el", "E2E latency"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_samples(result: dict, metric: str) -> np.ndarray:
    """Milliseconds of one metric from a run result's per-request arrays (successful requests)."""
    ttfts, latencies = result.get("ttfts") or [], result.get("latencies") or []
    if metric == "ttft":
        values = [t for t in ttfts if t is not None]
    elif metric == "e2el":
        values = [t for t in latencies if t is not None]
    elif metric == "itl":
        values = [gap for gaps in result.get("itls") or [] for gap in gaps]
    elif metric == "tpot":
        outs = result.get("output_lens") or []
        values = [(e - t) / (n - 1) for t, e, n in zip(ttfts, latencies, outs) if t is not None and e is not None and n > 1]
    else:
        raise ValueError(f"no CDF for {metric!r}")
    return np.sort(np.asarray(values, dtype=float) * 1000.0)


def plot_latency_cdfs(results: Sequence[tuple[str, dict]], path: Path) -> Path:
    """One 2×2 figure of latency CDFs, a curve per labelled run result."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (metric, title) in zip(axes.flat, _CDF_PANELS):
        spans = []
        for label, result in results:
            x = latency_samples(result, metric)
            if x.size == 0:
                continue
            y = np.arange(1, x.size + 1) / x.size
            p50, p99 = np.percentile(x, 50), np.percentile(x, 99)
            ax.step(np.r_[x[0], x], np.r_[0.0, y], where="post", label=f"{label} (p50 {p50:.1f}, p99 {p99:.1f} ms)")
            spans.append((x[0], x[-1]))
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        for level in (0.5, 0.99):
            ax.axhline(level, color="grey", linewidth=0.5, linestyle=":")
        if spans:
            lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
            if lo > 0 and hi / lo > 100:  # wide ranges (a cold tail, mixed scales) read better on log x
                ax.set_xscale("log")
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.suptitle("Latency CDFs" + (f": {results[0][0]}" if len(results) == 1 else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(runs: list[dict], key: str) -> list[float]:
    return [as_float(r.get(key)) for r in runs]


def plot_sweep(sweeps: Sequence[tuple[str, dict]], path: Path) -> Path:
    """Throughput, errors and latency against the swept load, a line per labelled sweep result."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    variable = sweeps[0][1]["sweep"]["variable"]
    xlabel = "offered request rate (req/s)" if variable == "request_rate" else "max concurrency"
    for i, (label, sweep) in enumerate(sweeps):
        color = f"C{i}"
        runs = sweep["runs"]
        x = [as_float(r["load"].get(variable)) for r in runs]
        ax = axes[0, 0]
        ax.plot(x, _series(runs, "request_throughput"), "o-", color=color, label=label)
        if any(r.get("request_goodput") is not None for r in runs):
            ax.plot(x, _series(runs, "request_goodput"), "s--", color=color, label=f"{label} goodput")
        axes[0, 1].plot(x, _series(runs, "output_throughput"), "o-", color=color, label=label)
        failed = [r.get("failed", 0) / max(1, r.get("num_requests") or r.get("completed", 0) + r.get("failed", 0)) for r in runs]
        axes[0, 2].plot(x, [100 * f for f in failed], "o-", color=color, label=label)
        for ax, metric in zip(axes[1], ("ttft", "tpot", "e2el")):
            ax.plot(x, _series(runs, f"median_{metric}_ms"), "o-", color=color, label=f"{label} p50")
            ax.plot(x, _series(runs, f"p99_{metric}_ms"), "^--", color=color, label=f"{label} p99")
    if variable == "request_rate":  # the ideal: everything offered is served
        xs = [v for _, s in sweeps for v in (as_float(r["load"].get(variable)) for r in s["runs"]) if math.isfinite(v)]
        if xs:
            axes[0, 0].plot([0, max(xs)], [0, max(xs)], color="grey", linewidth=0.8, linestyle=":", label="offered")
    titles = [["request throughput (req/s)", "output token throughput (tok/s)", "failed requests (%)"], ["TTFT (ms)", "TPOT (ms)", "E2E latency (ms)"]]
    for row, row_titles in zip(axes, titles):
        for ax, title in zip(row, row_titles):
            ax.set_ylim(bottom=0)  # throughput and latency read against zero
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    axes[0, 2].set_ylim(0, max(5.0, axes[0, 2].get_ylim()[1]))  # 0% failed is a flat line at the bottom
    fig.suptitle(f"Sweep by {variable}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
