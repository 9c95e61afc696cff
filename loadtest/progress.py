"""A progress bar on stderr while a run goes: jobs done of the count, or seconds of the duration.

It polls the runner's counters a few times a second (the runner knows nothing of it), so a slow
terminal never slows the load. Off with --no-progress, and when stderr is not a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .load_runner import LoadRunner

_POLL_S = 0.25


@contextlib.asynccontextmanager
async def progress_bar(runner: LoadRunner, title: str, enabled: bool = True):
    """Show progress while the body runs; the bar is finished and removed on exit."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:  # in a log file a bar is only noise
        yield
        return
    spec = runner.spec
    by_count = spec.num_prompts is not None
    total = spec.num_prompts if by_count else spec.warmup_seconds + spec.duration
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn() if by_count else TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("{task.fields[counts]}")]  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(title, total=total, counts="")

        async def poll() -> None:
            while True:
                s = runner.stats()
                done = s["jobs_done"] if by_count else min(total, runner.elapsed())
                warm = f"warm-up {s['warmup']} · " if s["warmup"] else ""
                bar.update(task, completed=done, counts=f"{warm}ok {s['ok']} · failed {s['failed']} · in flight {s['in_flight']}")
                await asyncio.sleep(_POLL_S)

        poller = asyncio.create_task(poll())
        try:
            yield
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
