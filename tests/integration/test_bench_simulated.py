"""`tandem bench` end to end against simulated workers: a real gateway process and a simulated
fleet process (python -m loadtest.sim.fleet) over a real etcd. The shared-prefix workload must
report the cached tokens the simulated workers' prefix caches really served, and compare must lay
two policies' results side by side (the policy switched live through the etcd key)."""

from __future__ import annotations

import json

import pytest

from benchmarks.sim_stack import SimStack
from loadtest.bench_cli import main as bench


@pytest.fixture
def sim_stack(tmp_path):
    """etcd, a gateway process and 4 simulated decode workers (20x faster than calibrated)."""
    with SimStack(tmp_path / "stack", num_decode=4, fleet_args=["--time-scale", "0.05"]) as stack:
        yield stack


def test_shared_prefix_bench_over_simulated_workers_per_policy(sim_stack, tmp_path):
    results = {}
    for i, policy in enumerate(("prefix-aware", "round-robin")):
        if i:
            sim_stack.restart_fleet()  # empty caches
        sim_stack.set_policy(policy)
        out = tmp_path / policy
        args = ["shared-prefix", "--gateway", sim_stack.gateway, "--num-groups", "4", "--prompts-per-group", "6", "--system-prompt-len", "256",
                "--question-len", "32", "--output-len", "8", "--request-rate", "20", "--seed", "3", "--label", policy, "--out", str(out),
                "--no-progress", "--no-plots"]  # fmt: skip
        assert bench(args) == 0
        results[policy] = json.loads((out / "result.json").read_text())
    for policy, r in results.items():
        assert (r["completed"], r["failed"]) == (24, 0), policy
        assert r["total_input_tokens"] == 24 * (256 + 32) and r["total_output_tokens"] == 24 * 8
    # 4 groups on 4 workers: prefix-aware keeps each group where its system prompt is cached, so
    # every request but each group's first hits its 16 blocks; round-robin spreads every group over
    # every worker and misses more
    prefix_aware = results["prefix-aware"]["total_cached_prompt_tokens"]
    assert prefix_aware >= (24 - 4) * 256 * 0.9, results["prefix-aware"]["prefix_cache_hit_rate"]
    assert prefix_aware > results["round-robin"]["total_cached_prompt_tokens"]
    assert bench(["compare", str(tmp_path / "prefix-aware" / "result.json"), str(tmp_path / "round-robin" / "result.json"), "--no-plots"]) == 0
