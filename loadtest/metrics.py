"""The numbers, defined as `vllm bench serve` defines them (and inference-perf, for NTPOT).

Per successful request (status OK):
    TTFT   first token-bearing chunk − send
    TPOT   (E2EL − TTFT) / (output tokens − 1); only requests with more than one output token
    ITL    every gap between consecutive token-bearing chunks, pooled over all requests
    E2EL   end of stream − send
    NTPOT  E2EL / output tokens (inference-perf's normalized time per output token; opt-in)
Over the run (measured requests only; warm-up excluded), duration = the measured window:
    request_throughput      completed / duration
    output_throughput       output tokens of completed requests / duration
    total_token_throughput  (prompt + output tokens of completed requests) / duration
    request_goodput         completed requests that meet every SLO / duration (vLLM counts TPOT as 0
                            for a one-token answer), None without SLOs
    prefix_cache_hit_rate   Σ cached prompt tokens / Σ prompt tokens, both as the server reports them
    max_output_tokens_per_s the busiest whole second; max_concurrent_requests: the peak in flight
Each latency gets mean, median, std and the chosen percentiles, in milliseconds, under vLLM's
keys (mean_ttft_ms, p99_itl_ms, ...). Percentiles use numpy's default (linear) method, as vLLM
does. A statistic with no data is None (JSON null), never a made-up 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .timeline import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el", "ntpot")
DEFAULT_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)
_SLO_NAMES = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "e2e": "e2el"}


@dataclass(frozen=True)
class SLO:
    """Service level objectives for goodput, in milliseconds; an unset one is not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "SLO":
        """'ttft=500,tpot=50,e2e=2000' (ms; '0.5s' and vLLM's 'ttft:500' spelling work too)."""
        values: dict[str, float] = {}
        for item in filter(None, re.split(r"[,\s]+", spec.strip())):
            m = re.fullmatch(r"([a-z0-9]+)[=:]([0-9.]+(?:e-?[0-9]+)?)(ms|s)?", item.strip().lower())
            if not m or m.group(1) not in _SLO_NAMES:
                raise ValueError(f"SLO {item!r}: write NAME=MILLISECONDS with NAME one of ttft, tpot, e2e (e.g. ttft=500,tpot=50)")
            value = float(m.group(2)) * (1000.0 if m.group(3) == "s" else 1.0)
            values[f"{_SLO_NAMES[m.group(1)]}_ms"] = value
        if not values:
            raise ValueError("SLO: name at least one of ttft, tpot, e2e")
        return cls(**values)

    def met_by(self, r: RequestRecord) -> bool:
        """A successful request meets the SLO when every set objective holds."""
        ttft, e2el = r.ttft, r.e2el
        tpot = r.tpot or 0.0  # vLLM: a request with one output token has TPOT 0 for goodput
        checks = ((self.ttft_ms, ttft), (self.tpot_ms, tpot), (self.e2el_ms, e2el))
        return r.success and all(limit is None or (value is not None and value * 1000 <= limit) for limit, value in checks)

    def to_json(self) -> dict:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms)) if v is not None}


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 → 'p99', 99.9 → 'p99.9'."""
    return f"p{int(p)}" if int(p) == p else f"p{p}"


def latency_stats(name: str, values_s: Sequence[float], percentiles: Iterable[float]) -> dict:
    """mean/median/std/pNN of `values_s` (seconds) as {mean_<name>_ms: ..., ...}; None when empty."""
    a = np.asarray(values_s, dtype=float) * 1000.0
    out = {}
    empty = a.size == 0
    out[f"mean_{name}_ms"] = None if empty else float(np.mean(a))
    out[f"median_{name}_ms"] = None if empty else float(np.median(a))
    out[f"std_{name}_ms"] = None if empty else float(np.std(a))
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = None if empty else float(np.percentile(a, p))
    return out


def latency_values(records: Sequence[RequestRecord], name: str) -> list[float]:
    """The samples (seconds) behind one latency metric, from successful requests."""
    ok = [r for r in records if r.success]
    if name == "itl":
        return [gap for r in ok for gap in r.itls]
    if name == "ntpot":
        return [r.e2el / r.num_output_tokens for r in ok if r.e2el is not None and r.num_output_tokens > 0]
    values = (getattr(r, name) for r in ok)
    return [v for v in values if v is not None]


def peak_output_throughput(records: Sequence[RequestRecord]) -> float:
    """Output tokens in the busiest whole second, counted by chunk arrival (as vLLM, with each
    chunk's real token count)."""
    ok = [r for r in records if r.success and r.chunk_times]
    if not ok:
        return 0.0
    t0 = min(r.send for r in ok)
    buckets: Counter[int] = Counter()
    for r in ok:
        for t, n in zip(r.chunk_times, r.chunk_tokens):
            buckets[int(t - t0)] += n
    return float(max(buckets.values()))


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most successful requests in flight at once, over half-open [send, end) intervals."""
    events = sorted([(r.send, 1) for r in records if r.success] + [(r.end, -1) for r in records if r.success])
    peak = current = 0
    for _, delta in events:  # at equal times the end (-1) sorts first: half-open intervals
        current += delta
        peak = max(peak, current)
    return peak


def compute_metrics(
    records: Sequence[RequestRecord],
    duration: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    metrics: Sequence[str] = DEFAULT_METRICS,
    slo: SLO | None = None,
) -> dict:
    """The summary of the measured (non-warm-up) records over `duration` seconds. Does not mutate."""
    for name in metrics:
        if name not in LATENCY_METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(LATENCY_METRICS)}")
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.success]
    if not duration > 0 or not math.isfinite(duration):
        raise ValueError(f"duration must be a positive number of seconds, got {duration}")
    total_input = sum(r.num_prompt_tokens for r in ok)
    total_output = sum(r.num_output_tokens for r in ok)
    with_usage = [r for r in ok if r.prompt_tokens is not None and r.cached_prompt_tokens is not None]
    prompt_with_usage = sum(r.prompt_tokens for r in with_usage)
    cached = sum(r.cached_prompt_tokens for r in with_usage)
    errors = Counter(r.status or "CANCELLED" for r in measured if not r.success)
    out = {
        "duration": duration,
        "num_requests": len(measured),
        "completed": len(ok),
        "failed": len(measured) - len(ok),
        "errors_by_status": dict(sorted(errors.items())),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "total_cached_prompt_tokens": cached,
        "prefix_cache_hit_rate": cached / prompt_with_usage if prompt_with_usage else None,
        "request_throughput": len(ok) / duration,
        "request_goodput": sum(slo.met_by(r) for r in ok) / duration if slo is not None else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": peak_output_throughput(ok),
        "max_concurrent_requests": peak_concurrency(ok),
    }
    for name in metrics:
        out.update(latency_stats(name, latency_values(ok, name), percentiles))
    return out


def per_request_arrays(records: Sequence[RequestRecord]) -> dict:
    """vLLM's per-request lists (seconds), over the measured requests in send order; a failed
    request has output length 0 and None latencies, as its error says why."""
    measured = sorted((r for r in records if not r.warmup), key=lambda r: r.index)
    return {
        "input_lens": [r.num_prompt_tokens for r in measured],
        "output_lens": [r.num_output_tokens if r.success else 0 for r in measured],
        "cached_lens": [r.cached_prompt_tokens for r in measured],
        "ttfts": [r.ttft if r.success else None for r in measured],
        "itls": [r.itls if r.success else [] for r in measured],
        "latencies": [r.e2el if r.success else None for r in measured],
        "start_times": [r.send for r in measured],
        "queue_times": [r.queue_time for r in measured],
        "statuses": [r.status for r in measured],
        "errors": [r.error for r in measured],
    }
