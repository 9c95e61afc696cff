"""One `tandem bench <workload>` invocation: connect, run once or sweep, print, write the files.

    Bench(args) ──► target ready? describe it ──► run_point() once, or per sweep point
        run_point: fresh cache salt → LoadRunner under a progress bar → run_result()
    ──► summary (or sweep) table on stdout, error examples on stderr ──► --out files

Ctrl-C and SIGTERM stop the run in flight (the runner cancels its requests) and whatever was
measured is still reported and written, marked interrupted; the exit status is then 130.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .bench_setup import default_label, make_load, make_target, make_workload, metric_options, parse_metadata


def cache_salt(setting: str) -> str:
    """The salt for one run: fresh per run by default (see --cache-salt)."""
    import uuid

    if setting == "fresh":
        return f"bench-{uuid.uuid4().hex[:12]}"
    return "" if setting == "none" else setting


class Bench:
    """One `tandem bench <workload>` invocation: a run, or the runs of a sweep."""

    def __init__(self, args, argv: list[str] | None):
        from rich.console import Console

        from .result import RunContext
        from .run_info import command_line, machine_info

        self.args = args
        self.workload = make_workload(args, args.seed)
        self.load, self.variable, self.values = make_load(args, self.workload)
        self.options = metric_options(args)
        self.target = make_target(args)
        self.label = args.label or default_label(args, self.load, self.variable)
        self.ctx = RunContext(
            command_line(argv), machine_info(), {}, self.workload.describe(), self.target.sampling.to_json(), self.label, parse_metadata(args.metadata)
        )
        self.err = Console(stderr=True)
        self.runner = None
        self.interrupted = False

    def stop(self) -> None:
        self.interrupted = True
        if self.runner is not None:
            self.runner.stop()

    async def run_point(self, load, label: str, title: str, details: bool = True):
        """One run; returns (result, outcome). Raises ValueError when nothing was measured."""
        import uuid

        from .load_runner import LoadRunner
        from .progress import progress_bar
        from .result import run_result

        self.target.cache_salt = cache_salt(self.args.cache_salt)
        self.runner = LoadRunner(self.target, self.workload.jobs(), load, run_id=f"bench-{uuid.uuid4().hex[:8]}")
        async with progress_bar(self.runner, title, self.args.progress):
            outcome = await self.runner.run()
        self.runner = None
        options = replace(self.options, details=self.options.details and details)
        result = run_result(outcome, {**load.to_json(), "cache_salt": self.target.cache_salt}, self.ctx, options, label)
        return result, outcome

    async def main(self) -> int:
        import asyncio
        import signal

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        try:
            async with self.target:
                await self.target.wait_ready(self.args.connect_timeout)
                self.ctx.target = await self.target.describe()
                if self.interrupted:  # Ctrl-C while connecting
                    return 130
                if self.variable is None:
                    return await self._single()
                return await self._sweep()
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

    async def _single(self) -> int:
        from .report import print_table, summary_table

        try:
            result, outcome = await self.run_point(self.load, self.label, self.label)
        except ValueError:
            if self.interrupted:
                self.err.print("interrupted before any request finished; nothing written")
                return 130
            raise
        print_table(summary_table(result))
        self._print_errors(outcome.records)
        self._write(result, [outcome.records], [(self.label, result)])
        if self.interrupted:
            return 130
        return 0 if result["completed"] else 1

    async def _sweep(self) -> int:
        from .report import fmt_number, print_table, sweep_table
        from .result import sweep_result
        from .sweep import auto_rates, run_sweep

        outcomes = []
        saturation = None
        values = self.values
        if self.variable == "request_rate" and not values:  # auto: measure saturation first
            sat_load = replace(self.load, request_rate=math.inf)
            try:
                saturation, outcome = await self.run_point(sat_load, f"{self.label}@saturation", "saturation run", details=False)
            except ValueError:
                if self.interrupted:
                    self.err.print("interrupted during the saturation run; nothing written")
                    return 130
                raise
            if self.interrupted:
                self.err.print("interrupted during the saturation run; nothing written")
                return 130
            self._print_errors(outcome.records)
            self.err.print(f"saturation: {saturation['request_throughput']:.3f} req/s served with every request offered at once")
            values = auto_rates(saturation["request_throughput"], self.args.sweep_points)

        async def point(variable: str, value: float, i: int) -> dict | None:
            load = replace(self.load, **{variable: value})
            label = f"{self.label}@{fmt_number(value)}"
            try:
                result, outcome = await self.run_point(load, label, f"{variable.replace('_', ' ')} {fmt_number(value)}")
            except ValueError:
                if self.interrupted:  # stopped before this point measured anything
                    return None
                raise
            outcomes.append(outcome)
            self.err.print(f"{label}: {result['completed']} ok, {result['failed']} failed, {result['request_throughput']:.2f} req/s, "
                           f"median TTFT {fmt_number(result.get('median_ttft_ms'), 1)} ms", markup=False)  # fmt: skip
            self._print_errors(outcome.records)
            return result

        runs = await run_sweep(self.variable, values, point, self.args.stop_at_saturation, self.args.saturation_threshold, stopped=lambda: self.interrupted)
        if not runs:
            self.err.print("interrupted before a point was measured; nothing written")
            return 130
        result = sweep_result(runs, self.variable, self.ctx, saturation)
        print_table(sweep_table(result))
        self._write(result, [o.records for o in outcomes], [(run["label"], run) for run in runs], sweep=True)
        return 130 if self.interrupted else 0

    def _print_errors(self, records) -> None:
        """One example message per failing status (the table only counts them)."""
        examples: dict[str, tuple[int, str]] = {}
        for r in records:
            if not r.warmup and not r.success:
                n, message = examples.get(r.status, (0, r.error))
                examples[r.status] = (n + 1, message)
        for status, (n, message) in sorted(examples.items()):
            self.err.print(f"{status} ×{n}, e.g.: {message}", markup=False, highlight=False)

    def _write(self, result: dict, record_sets: list, cdf_runs: list, sweep: bool = False) -> None:
        from .result import write_json, write_requests_jsonl

        out = self.args.out
        if out is None:
            self.err.print("(pass --out DIR to save the JSON result, the request timelines and the plots)")
            return
        write_json(out / "result.json", result)
        written = [out / "result.json"]
        for i, records in enumerate(record_sets):
            path = out / (f"requests-{i}.jsonl" if sweep else "requests.jsonl")
            write_requests_jsonl(path, records)
            written.append(path)
        if self.args.plots:
            from .plots import plot_latency_cdfs, plot_sweep

            written.append(plot_latency_cdfs(cdf_runs, out / "latency_cdf.png"))
            if sweep:
                written.append(plot_sweep([(result["label"], result)], out / "sweep.png"))
        self.err.print("wrote " + ", ".join(str(p) for p in written))
