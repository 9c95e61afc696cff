"""Sweeps: the same workload at several loads, to find where the system saturates.

    --request-rate 1,2,4,8          one run per rate (open loop)
    --request-rate auto             first a saturation run (every request at once, or paced by
                                    --max-concurrency) measures the most the system serves, R_max;
                                    then --sweep-points runs at R_max·k/n for k = 1..n (as
                                    inference-perf's sweep does)
    --max-concurrency 1,2,4,8       one run per concurrency (closed loop)
    --stop-at-saturation            stop once a point's achieved throughput falls below
                                    --saturation-threshold (default 0.9) of its offered rate, or
                                    when requests fail

Every point sends the same prompts (same seed) under its own fresh cache salt (see --cache-salt),
so a point never finds the previous point's prompts in the prefix cache and the points differ only
in load; the server drains between points.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

SWEEP_VARIABLES = ("request_rate", "max_concurrency")


def parse_values(text: str, integer: bool) -> list[float] | None:
    """'1,2,4' → [1, 2, 4]; a single value → None (no sweep); 'auto' → [] (decided by a saturation run)."""
    text = str(text).strip().lower()
    if text == "auto":
        if integer:
            raise ValueError("auto sweeps the request rate only; list the concurrencies (e.g. 1,2,4,8)")
        return []
    if "," not in text:
        return None
    try:
        values = [int(v) if integer else float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r}: a sweep is a comma-separated list of numbers") from None
    if len(values) < 2 or any(not v > 0 for v in values):
        raise ValueError(f"{text!r}: a sweep needs at least two values, each > 0")
    return values


def auto_rates(saturation_throughput: float, points: int) -> list[float]:
    """`points` rates spread evenly up to the saturation throughput (the last one is it)."""
    if not saturation_throughput > 0:
        raise ValueError("the saturation run completed no request, so there is no rate to sweep up to")
    if points < 1:
        raise ValueError(f"sweep points must be >= 1, got {points}")
    return [round(saturation_throughput * k / points, 3) for k in range(1, points + 1)]


def is_saturated(result: dict, offered_rate: float, threshold: float) -> bool:
    """True when the run served clearly less than it was offered (or failed requests)."""
    if not math.isfinite(offered_rate):
        return False
    achieved = result.get("request_throughput") or 0.0
    return achieved < threshold * offered_rate or (result.get("failed") or 0) > 0


RunPoint = Callable[[str, float, int], Awaitable[dict | None]]  # (variable, value, index) → run result; None: stop


async def run_sweep(
    variable: str, values: list[float], run_point: RunPoint, stop_at_saturation: bool = False, threshold: float = 0.9,
    stopped: Callable[[], bool] = lambda: False,
) -> list[dict]:  # fmt: skip
    """Run the points in order (lowest load first); stop early at saturation when asked, when
    `stopped()` turns true (Ctrl-C), or when a point returns None."""
    if variable not in SWEEP_VARIABLES:
        raise ValueError(f"cannot sweep {variable!r}; choose {', '.join(SWEEP_VARIABLES)}")
    runs = []
    for i, value in enumerate(sorted(values)):
        if stopped():
            break
        result = await run_point(variable, value, i)
        if result is None:
            break
        runs.append(result)
        if stop_at_saturation and variable == "request_rate" and is_saturated(result, value, threshold):
            break
    return runs
