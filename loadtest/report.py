"""Tables for people: a run's summary (laid out like `vllm bench serve` prints it), a sweep's one
row per point, and several results side by side (compare). One list of rows serves them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .metrics import percentile_key

_HEADERS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)", "itl": "Inter-token Latency",
            "e2el": "End-to-end Latency", "ntpot": "Normalized Time per Output Token"}  # fmt: skip
_SHORT = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL", "ntpot": "NTPOT"}


def fmt_number(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _errors(result: dict) -> str:
    errors = result.get("errors_by_status") or {}
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "-"


def summary_rows(result: dict) -> list[tuple[str, str] | str]:
    """(name, value) rows and section headers (plain strings) for one run."""
    rows: list[tuple[str, str] | str] = [
        ("Successful requests", fmt_number(result.get("completed"))),
        ("Failed requests", fmt_number(result.get("failed"))),
        ("Errors by status", _errors(result)),
        ("Benchmark duration (s)", fmt_number(result.get("duration"))),
        ("Total input tokens", fmt_number(result.get("total_input_tokens"))),
        ("Cached prompt tokens", fmt_number(result.get("total_cached_prompt_tokens"))),
        ("Prefix cache hit rate", _pct(result.get("prefix_cache_hit_rate"))),
        ("Total generated tokens", fmt_number(result.get("total_output_tokens"))),
        ("Request throughput (req/s)", fmt_number(result.get("request_throughput"))),
    ]
    if result.get("request_goodput") is not None:
        slo = ", ".join(f"{k}≤{v:g}ms" for k, v in (result.get("slo_ms") or {}).items())
        rows.append((escape(f"Request goodput (req/s) [{slo}]"), fmt_number(result["request_goodput"])))
    rows += [
        ("Output token throughput (tok/s)", fmt_number(result.get("output_throughput"))),
        ("Peak output token throughput (tok/s)", fmt_number(result.get("max_output_tokens_per_s"))),
        ("Peak concurrent requests", fmt_number(result.get("max_concurrent_requests"))),
        ("Total token throughput (tok/s)", fmt_number(result.get("total_token_throughput"))),
    ]
    for metric in result.get("percentile_metrics") or [m for m in _SHORT if f"mean_{m}_ms" in result]:
        rows.append(_HEADERS[metric])
        short = _SHORT[metric]
        rows.append((f"Mean {short} (ms)", fmt_number(result.get(f"mean_{metric}_ms"))))
        rows.append((f"Median {short} (ms)", fmt_number(result.get(f"median_{metric}_ms"))))
        for p in result.get("percentiles") or [99]:
            key = percentile_key(p)
            rows.append((f"{key.upper()} {short} (ms)", fmt_number(result.get(f"{key}_{metric}_ms"))))
    return rows


def describe_load(result: dict) -> str:
    load = result.get("load") or {}
    rate = load.get("request_rate", result.get("request_rate"))
    parts = []
    if rate not in (None, "inf", math.inf):
        parts.append(f"{float(rate):g} req/s" + (f" ({load['arrivals']})" if load.get("arrivals") else ""))
    if load.get("max_concurrency"):
        parts.append(f"max concurrency {load['max_concurrency']}")
    if not parts:
        parts.append("all at once")
    return ", ".join(parts)


def describe_target(result: dict) -> str:
    target = result.get("target") or {}
    mode = target.get("serving_mode")
    return f"{target.get('kind', '?')} {target.get('address', '?')}" + (f" ({mode})" if mode and mode != "auto" else "")


def summary_table(result: dict) -> Table:
    workload = (result.get("workload") or {}).get("workload", "?")
    title = f"{result.get('label') or workload}: {workload}, {describe_load(result)}"
    caption = f"{describe_target(result)}, model {result.get('model_id') or '?'}"
    if result.get("interrupted"):
        caption += " (interrupted: partial)"
    table = Table(title=title, caption=caption, show_header=False, title_justify="left", min_width=max(60, len(title) + 4))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in summary_rows(result):
        if isinstance(row, str):
            table.add_section()
            table.add_row(f"[bold]{row}[/bold]", "")
        else:
            table.add_row(*row)
    return table


def sweep_table(result: dict) -> Table:
    """One row per point of a sweep."""
    variable = result["sweep"]["variable"]
    table = Table(title=f"{result.get('label') or 'sweep'}: {(result.get('workload') or {}).get('workload', '?')} by {variable}", title_justify="left")
    goodput = any(run.get("request_goodput") is not None for run in result["runs"])
    columns = [  # (heading, cell)
        (variable, lambda r: fmt_number(r["load"].get(variable))),
        ("ok", lambda r: fmt_number(r.get("completed"))),
        ("failed", lambda r: fmt_number(r.get("failed"))),
        ("req/s", lambda r: fmt_number(r.get("request_throughput"))),
        ("out tok/s", lambda r: fmt_number(r.get("output_throughput"), 1)),
        *([("goodput", lambda r: fmt_number(r.get("request_goodput")))] if goodput else []),
        ("cache hit", lambda r: _pct(r.get("prefix_cache_hit_rate"))),
    ]
    for metric, short in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        columns.append((f"{short} p50", lambda r, m=metric: fmt_number(r.get(f"median_{m}_ms"), 1)))
        columns.append((f"{short} p99", lambda r, m=metric: fmt_number(r.get(f"p99_{m}_ms"), 1)))
    for heading, _ in columns:
        table.add_column(heading, justify="right")
    for run in result["runs"]:
        table.add_row(*[cell(run) for _, cell in columns])
    return table


def compare_table(results: Sequence[tuple[str, dict]]) -> Table:
    """Runs side by side: one column per (label, run result), rows as in the summary."""
    table = Table(title="tandem bench compare", title_justify="left")
    table.add_column("metric")
    for label, _ in results:
        table.add_column(label, justify="right")
    table.add_row("Workload", *[escape((r.get("workload") or {}).get("workload", "?")) for _, r in results])
    table.add_row("Load", *[escape(describe_load(r)) for _, r in results])
    table.add_row("Target", *[escape(describe_target(r)) for _, r in results])
    table.add_section()
    per_run = [dict(r for r in summary_rows(result) if not isinstance(r, str)) for _, result in results]
    names: list[str] = []
    for _, result in results:
        for row in summary_rows(result):
            name = row if isinstance(row, str) else row[0]
            if name not in names:
                names.append(name)
    headers = set(_HEADERS.values())
    for name in names:
        if name in headers:
            table.add_section()
            table.add_row(f"[bold]{name}[/bold]", *[""] * len(results))
        else:
            table.add_row(name, *[values.get(name, "-") for values in per_run])
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print without truncating cells: rich would squeeze a wide table into 80 columns (its width
    for pipes and files) and cut numbers to "1.…"; a wide line may wrap, a number never hides."""
    if console is None:
        console = Console()
        console.width = max(console.width, 200)
    console.print(table)
