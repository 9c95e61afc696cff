"""The result files: one JSON per run (or per sweep of runs), and the raw timelines as JSONL.

A run's JSON is flat where vLLM's `bench serve --save-result` is (completed, failed,
total_input_tokens, request_throughput, mean_ttft_ms, p99_itl_ms, ..., ttfts, itls), so tools that
read vLLM results read these; Tandem's additions sit beside them (errors_by_status,
prefix_cache_hit_rate, total_cached_prompt_tokens, and what the run was: workload, load, target,
machine, command, date). A sweep's JSON holds one such run per point under "runs".

    out/result.json      the summary (+ per-request arrays unless --no-details)
    out/requests.jsonl   every request's timeline: send, each chunk's time and tokens, end, status
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .load_runner import RunOutcome
from .metrics import DEFAULT_METRICS, DEFAULT_PERCENTILES, SLO, compute_metrics, per_request_arrays
from .timeline import RequestRecord

SCHEMA = "tandem-bench/1"


@dataclass(frozen=True)
class MetricOptions:
    percentiles: Sequence[float] = DEFAULT_PERCENTILES
    metrics: Sequence[str] = DEFAULT_METRICS
    slo: SLO | None = None
    details: bool = True  # the per-request arrays (needed for CDF plots and compare)


@dataclass
class RunContext:
    """What every run of one invocation shares: recorded beside the numbers."""

    command: str
    machine: dict
    target: dict
    workload: dict
    sampling: dict
    label: str = ""
    metadata: dict = field(default_factory=dict)


def run_result(outcome: RunOutcome, load: dict, ctx: RunContext, options: MetricOptions, label: str | None = None) -> dict:
    """The JSON of one run; raises ValueError when no measured request ended (nothing to report)."""
    duration = outcome.duration
    if duration is None:
        raise ValueError("no measured request ended, so there is nothing to measure (more prompts, a longer duration, or a shorter warm-up?)")
    warm = [r for r in outcome.records if r.warmup]
    result = {
        "schema": SCHEMA,
        "kind": "run",
        "label": label or ctx.label,
        "date": outcome.started_at,
        "command": ctx.command,
        "machine": ctx.machine,
        "target": ctx.target,
        "model_id": ctx.target.get("model_id"),
        "workload": ctx.workload,
        "load": load,
        "sampling": ctx.sampling,
        "metadata": ctx.metadata,
        # vLLM's top-level names for the load
        "request_rate": load.get("request_rate"),
        "burstiness": load.get("burstiness"),
        "max_concurrency": load.get("max_concurrency"),
        "percentiles": list(options.percentiles),
        "percentile_metrics": list(options.metrics),
        "slo_ms": options.slo.to_json() if options.slo else None,
        "interrupted": outcome.interrupted,
        "wall_seconds": outcome.wall_seconds,
        "client_cpu_seconds": outcome.client_cpu_seconds,
        "num_warmup_requests": len(warm),
        "num_warmup_failed": sum(not r.success for r in warm),
    }
    result.update(compute_metrics(outcome.records, duration, options.percentiles, options.metrics, options.slo))
    if options.details:
        result.update(per_request_arrays(outcome.records))
    return result


def sweep_result(runs: list[dict], variable: str, ctx: RunContext, saturation: dict | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "kind": "sweep",
        "label": ctx.label,
        "date": runs[0]["date"] if runs else None,
        "command": ctx.command,
        "machine": ctx.machine,
        "target": ctx.target,
        "model_id": ctx.target.get("model_id"),
        "workload": ctx.workload,
        "sampling": ctx.sampling,
        "metadata": ctx.metadata,
        "sweep": {"variable": variable, "values": [run["load"].get(variable) for run in runs], "saturation_run": saturation},
        "runs": runs,
    }


def _finite(obj):
    """JSON has no inf/nan: write them as strings ("inf"), so the file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=1) + "\n")


def write_requests_jsonl(path: Path, records: Sequence[RequestRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(_finite(r.to_json())) + "\n")


def load_result(path: Path) -> dict:
    """A result file: ours (run or sweep), or a vLLM `bench serve` result (read as a run)."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a result ({e})") from None
    if not isinstance(result, dict) or ("completed" not in result and result.get("kind") != "sweep"):
        raise ValueError(f"{path}: not a tandem bench (or vLLM bench serve) result")
    result.setdefault("kind", "run")
    return result


def as_float(value) -> float:
    """A rate as written in a result ("inf" strings included)."""
    return float(value) if value is not None else math.nan
