"""Result files, sweeps, tables, plots and the command line of `tandem bench`, without a server."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from rich.console import Console

from loadtest.bench_cli import build_parser, main
from loadtest.bench_setup import make_load, make_target, make_workload
from loadtest.compare import compare, labelled, runs_of
from loadtest.load_runner import RunOutcome
from loadtest.metrics import SLO
from loadtest.plots import latency_samples, plot_latency_cdfs, plot_sweep
from loadtest.report import compare_table, summary_table, sweep_table
from loadtest.result import MetricOptions, RunContext, load_result, run_result, sweep_result, write_json
from loadtest.sweep import auto_rates, is_saturated, parse_values, run_sweep
from loadtest.timeline import RequestRecord

VLLM_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
             "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
             "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "input_lens", "output_lens", "ttfts", "itls",
             "errors", "max_output_tokens_per_s", "max_concurrent_requests", "request_rate", "burstiness", "max_concurrency")  # fmt: skip


def record(i: int, ttft: float, gap: float, n: int = 4, status: str = "OK") -> RequestRecord:
    r = RequestRecord(index=i, request_id=f"r{i}", job=i, warmup=False, scheduled=0.1 * i, expected_prompt_tokens=16)
    r.send = 0.1 * i
    r.chunk_times = [r.send + ttft + k * gap for k in range(n)]
    r.chunk_tokens = [1] * n
    r.end = r.chunk_times[-1]
    r.status = status
    r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens = 16, 8, n
    return r


def a_result(label: str = "x", ttft: float = 0.05, rate: float = 2.0) -> dict:
    outcome = RunOutcome([record(i, ttft, 0.01) for i in range(6)], 0.0, 1.0, "2026-01-01T00:00:00+00:00", 1.2, 0.1)
    ctx = RunContext("tandem bench random", {"cpu_count": 2}, {"kind": "gateway", "address": "a:1", "model_id": "m"}, {"workload": "random"}, {}, label)
    load = {"request_rate": rate, "burstiness": 1.0, "max_concurrency": None, "arrivals": "Poisson process"}
    return run_result(outcome, load, ctx, MetricOptions(slo=SLO(ttft_ms=60)))


def test_run_result_has_vllms_fields_and_tandems(tmp_path):
    r = a_result()
    assert all(k in r for k in VLLM_KEYS)
    assert r["completed"] == 6 and r["prefix_cache_hit_rate"] == 0.5 and r["request_goodput"] == pytest.approx(6.0)
    assert r["model_id"] == "m" and r["slo_ms"] == {"ttft": 60}
    write_json(tmp_path / "r.json", {**r, "request_rate": math.inf})
    text = (tmp_path / "r.json").read_text()
    assert '"request_rate": "inf"' in text and "Infinity" not in text  # standard JSON
    assert load_result(tmp_path / "r.json")["completed"] == 6


def test_nothing_measured_is_an_error_not_a_result():
    outcome = RunOutcome([], 0.0, None, "d", 0.0, 0.0)
    with pytest.raises(ValueError, match="no measured request"):
        run_result(outcome, {}, RunContext("", {}, {}, {}, {}), MetricOptions())


def test_vllm_results_load_and_junk_is_refused(tmp_path):
    (tmp_path / "vllm.json").write_text(json.dumps({"completed": 10, "mean_ttft_ms": 12.0, "request_rate": "inf"}))
    assert load_result(tmp_path / "vllm.json")["kind"] == "run"
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a tandem bench"):
        load_result(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_result(tmp_path / "missing.json")


def test_tables_render_every_run_and_sweep_point():
    console = Console(width=250, record=True)
    console.print(summary_table(a_result("solo")))
    sweep = sweep_result([a_result("s@1", rate=1.0), a_result("s@2", rate=2.0)], "request_rate", RunContext("", {}, {}, {"workload": "random"}, {}, "s"))
    console.print(sweep_table(sweep))
    runs = runs_of([("base", a_result()), ("s", sweep)])
    assert [label for label, _ in runs] == ["base", "s@1.00", "s@2.00"]
    console.print(compare_table(runs))
    text = console.export_text()
    assert "Successful requests" in text and "P99 TTFT (ms)" in text and "[ttft≤60ms]" in text
    assert "goodput" in text and "s@2.00" in text and "TTFT p50" in text


def test_compare_labels_and_plot(tmp_path):
    write_json(tmp_path / "a" / "result.json", a_result("fast", ttft=0.02))
    write_json(tmp_path / "b.json", a_result("", ttft=0.2))
    pairs = labelled([tmp_path / "a" / "result.json", tmp_path / "b.json"])
    assert [label for label, _ in pairs] == ["fast", "b"]
    with pytest.raises(ValueError, match="one label per file"):
        labelled([tmp_path / "b.json"], ["x", "y"])
    written = compare([tmp_path / "a" / "result.json", tmp_path / "b.json"], ["A", "B"], tmp_path / "out", console=Console(record=True))
    assert written == [tmp_path / "out" / "compare_latency_cdf.png"] and written[0].stat().st_size > 10_000


def test_plots_are_written_and_samples_come_from_the_arrays(tmp_path):
    r = a_result()
    assert latency_samples(r, "ttft").tolist() == pytest.approx([50.0] * 6)
    assert latency_samples(r, "tpot").tolist() == pytest.approx([10.0] * 6)
    assert len(latency_samples(r, "itl")) == 18
    assert plot_latency_cdfs([("x", r)], tmp_path / "cdf.png").stat().st_size > 10_000
    sweep = sweep_result([a_result(rate=1.0), a_result(rate=2.0)], "request_rate", RunContext("", {}, {}, {}, {}, "s"))
    assert plot_sweep([("s", sweep)], tmp_path / "sweep.png").stat().st_size > 10_000


def test_sweep_values_auto_rates_and_saturation():
    assert parse_values("4", integer=False) is None and parse_values("1,2,4", integer=False) == [1, 2, 4]
    assert parse_values("auto", integer=False) == [] and parse_values("1,8", integer=True) == [1, 8]
    for bad in ("1,x", "4,", "0,1"):
        with pytest.raises(ValueError):
            parse_values(bad, integer=False)
    with pytest.raises(ValueError):
        parse_values("auto", integer=True)
    assert auto_rates(10.0, 4) == [2.5, 5.0, 7.5, 10.0]
    with pytest.raises(ValueError):
        auto_rates(0.0, 3)
    assert is_saturated({"request_throughput": 3.0, "failed": 0}, 4.0, 0.9)
    assert not is_saturated({"request_throughput": 3.8, "failed": 0}, 4.0, 0.9)
    assert is_saturated({"request_throughput": 4.0, "failed": 1}, 4.0, 0.9)
    assert not is_saturated({"request_throughput": 1.0, "failed": 0}, math.inf, 0.9)


def test_run_sweep_goes_up_and_stops_at_saturation():
    seen = []

    async def point(variable, value, i):
        seen.append(value)
        return {"request_throughput": min(value, 3.0), "failed": 0}

    runs = asyncio.run(run_sweep("request_rate", [8, 1, 2, 4], point, stop_at_saturation=True))
    assert seen == [1, 2, 4] and len(runs) == 3  # 4 offered, 3 served: saturated, 8 never tried
    seen.clear()
    asyncio.run(run_sweep("request_rate", [1, 2, 4], point, stopped=lambda: len(seen) == 2))
    assert seen == [1, 2]


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_arguments_build_the_run():
    args = parse("shared-prefix", "--num-groups", "3", "--prompts-per-group", "2", "--system-prompt-len", "32", "--request-rate", "2", "--burstiness", "inf")
    workload = make_workload(args, args.seed)
    load, variable, values = make_load(args, workload)
    assert (load.num_prompts, load.request_rate, load.burstiness, variable) == (6, 2.0, math.inf, None)
    load, variable, values = make_load(parse("random", "--max-concurrency", "1,2,4", "--duration", "5"), workload)
    assert (variable, values, load.max_concurrency, load.duration, load.num_prompts) == ("max_concurrency", [1, 2, 4], 1, 5, None)
    assert make_load(parse("multi-turn"), workload)[0].num_prompts == 16
    # a rate sweep limited by duration (each point runs 20 s) is valid: it starts at its first rate
    load, variable, values = make_load(parse("random", "--request-rate", "1,2,4", "--duration", "20"), workload)
    assert (variable, values, load.request_rate, load.duration) == ("request_rate", [1.0, 2.0, 4.0], 1.0, 20)


@pytest.mark.parametrize("argv, message", [
    (["random", "--input-len", "uniform:9:1"], "low <= high"),
    (["random", "--request-rate", "fast"], "--request-rate"),
    (["random", "--request-rate", "1,2", "--max-concurrency", "1,2"], "not both"),
    (["random", "--duration", "5"], "needs --max-concurrency"),
    (["random", "--num-prompts", "0"], "num_prompts"),
    (["random", "--slo", "latency=5"], "SLO"),
    (["random", "--percentile-metrics", "ttft,speed"], "unknown 'speed'"),
    (["random", "--metric-percentiles", "0,99"], "(0, 100]"),
    (["random", "--worker", "a:1", "--prompt-format", "text"], "token ids only"),
    (["random", "--metadata", "novalue"], "KEY=VALUE"),
])  # fmt: skip
def test_mistakes_exit_2_saying_what_to_fix(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_worker_target_takes_no_serving_mode():
    with pytest.raises(ValueError, match="serving-mode"):
        make_target(parse("random", "--worker", "a:1", "--serving-mode", "disaggregated"))


def test_the_harness_stays_light():
    """DESIGN §2: loadtest imports protos and services.common only: never torch, the engine or the gateway."""
    import subprocess
    import sys

    modules = "loadtest.bench_cli, loadtest.bench, loadtest.bench_setup, loadtest.load_runner, loadtest.targets, loadtest.metrics, loadtest.result, loadtest.report, loadtest.plots, loadtest.compare, loadtest.progress, loadtest.workloads"
    code = (
        f"import sys, tandem.cli, {modules}; import loadtest.plots as p; p._pyplot(); "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('services.engine', 'gateway'))]; print(bad); sys.exit(3 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
