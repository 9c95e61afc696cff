"""`tandem bench` against real services: a tiny random Llama behind a real gateway (token ids), and
the default model with its tokenizer (text and chat). Short runs; the checks are on result.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtest.bench_cli import main as bench
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

TINY_VOCAB = "384"  # tests/helpers/tiny_models.py
BLOCK = 16  # the workers' default block size


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory, tiny_llama):
    with running_cluster(tmp_path_factory.mktemp("bench-cluster"), model=str(tiny_llama), tokenizer=False, num_prefill=0, num_decode=1) as c:
        yield c


def result_of(out) -> dict:
    return json.loads((out / "result.json").read_text())


def run_bench(*argv: str) -> None:
    assert bench([*argv, "--no-progress"]) == 0


def test_random_workload_through_the_tandem_cli(tiny_cluster, tmp_path):
    out = tmp_path / "random"
    cmd = [sys.executable, "-m", "tandem", "bench", "random", "--gateway", tiny_cluster.gateway_address, "--vocab-size", TINY_VOCAB,
           "--input-len", "20", "--output-len", "4", "--num-prompts", "6", "--max-concurrency", "3", "--warmup", "2",
           "--slo", "ttft=60000,tpot=60000", "--out", str(out), "--label", "tiny", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "Successful requests" in proc.stdout and "TTFT" in proc.stdout
    r = result_of(out)
    assert (r["completed"], r["failed"], r["num_requests"], r["num_warmup_requests"]) == (6, 0, 6, 2)
    assert r["total_input_tokens"] == 6 * 20 and r["total_output_tokens"] == 6 * 4
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs: every request is good
    assert len(r["ttfts"]) == 6 and all(len(gaps) >= 1 for gaps in r["itls"])
    assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"] and r["mean_tpot_ms"] > 0
    assert r["max_concurrent_requests"] <= 3 and r["errors_by_status"] == {}
    assert r["command"].startswith("tandem bench random") and r["machine"]["cpu_count"] and r["model_id"]
    assert r["target"]["workers"].get("decode") == 1
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 8 and sum(json.loads(line)["warmup"] for line in lines) == 2
    assert (out / "latency_cdf.png").stat().st_size > 10_000


def test_shared_prefix_groups_hit_the_prefix_cache(tiny_cluster, tmp_path):
    # sequential (concurrency 1), so each group's later prompts find its 2-block prefix cached
    out = tmp_path / "shared"
    run_bench("shared-prefix", "--gateway", tiny_cluster.gateway_address, "--vocab-size", TINY_VOCAB, "--num-groups", "2", "--prompts-per-group", "3",
              "--system-prompt-len", str(2 * BLOCK), "--question-len", "8", "--output-len", "4", "--max-concurrency", "1", "--seed", "11",
              "--out", str(out), "--no-plots")  # fmt: skip
    r = result_of(out)
    assert r["completed"] == 6 and r["failed"] == 0
    assert r["total_cached_prompt_tokens"] == 2 * 2 * 2 * BLOCK  # 2 groups × 2 warm prompts × the prefix
    assert r["prefix_cache_hit_rate"] == pytest.approx(128 / (6 * 40))


def test_multi_turn_conversations_find_their_history_cached(tiny_cluster, tmp_path):
    out = tmp_path / "multi"
    run_bench("multi-turn", "--gateway", tiny_cluster.gateway_address, "--vocab-size", TINY_VOCAB, "--num-turns", "3", "--question-len", "8",
              "--output-len", "4", "--system-prompt-len", str(BLOCK), "--num-prompts", "2", "--max-concurrency", "2", "--out", str(out), "--no-plots")  # fmt: skip
    r = result_of(out)
    assert r["completed"] == 6 and r["failed"] == 0  # 2 conversations × 3 turns
    assert r["input_lens"][:1] == [24] and sorted(set(r["input_lens"])) == [24, 36, 48]
    assert r["total_cached_prompt_tokens"] >= 2 * 2 * BLOCK  # every later turn finds at least its first block


def test_one_worker_directly_and_a_file_workload(tiny_cluster, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_token_ids": [5, 6, 7, 8], "output_len": 3}\n{"input_len": 30}\n')
    out = tmp_path / "file"
    run_bench("file", str(prompts), "--worker", tiny_cluster.service("decode-0").address, "--vocab-size", TINY_VOCAB, "--num-prompts", "4",
              "--output-len", "2", "--out", str(out), "--no-plots")  # fmt: skip
    r = result_of(out)
    assert r["target"]["kind"] == "worker" and r["completed"] == 4
    assert r["input_lens"] == [4, 30, 4, 30] and r["output_lens"] == [3, 2, 3, 2]


def test_concurrency_sweep_and_compare(tiny_cluster, tmp_path, capsys):
    run_bench("random", "--gateway", tiny_cluster.gateway_address, "--vocab-size", TINY_VOCAB, "--input-len", "16", "--output-len", "3",
              "--num-prompts", "4", "--max-concurrency", "1,2", "--out", str(tmp_path / "sweep"))  # fmt: skip
    sweep = result_of(tmp_path / "sweep")
    assert sweep["kind"] == "sweep" and sweep["sweep"]["values"] == [1, 2]
    assert [run["completed"] for run in sweep["runs"]] == [4, 4] and [run["max_concurrency"] for run in sweep["runs"]] == [1, 2]
    assert (tmp_path / "sweep" / "sweep.png").exists() and (tmp_path / "sweep" / "requests-1.jsonl").exists()
    run_bench("random", "--gateway", tiny_cluster.gateway_address, "--vocab-size", TINY_VOCAB, "--input-len", "16", "--output-len", "3",
              "--num-prompts", "4", "--out", str(tmp_path / "burst"), "--no-plots")  # fmt: skip
    capsys.readouterr()
    assert bench(["compare", str(tmp_path / "sweep" / "result.json"), str(tmp_path / "burst" / "result.json"), "--labels", "sw,burst",
                  "--out", str(tmp_path / "cmp")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "sw@1" in table and "sw@2" in table and "burst" in table and "Mean TTFT (ms)" in table
    assert (tmp_path / "cmp" / "compare_latency_cdf.png").exists()


def test_unreachable_gateway_fails_fast_with_a_clear_message(tmp_path, capsys):
    assert bench(["random", "--gateway", "127.0.0.1:1", "--connect-timeout", "1", "--num-prompts", "1", "--no-progress"]) == 1
    assert "nothing answers gRPC at 127.0.0.1:1" in capsys.readouterr().err


def test_text_and_chat_workloads_through_the_tokenizer(cluster, tmp_path):
    """The default model: text prompts and chat conversations are tokenized by the gateway."""
    run_bench("random", "--gateway", cluster.gateway_address, "--prompt-format", "text", "--input-len", "24", "--output-len", "4",
              "--num-prompts", "3", "--out", str(tmp_path / "text"), "--no-plots")  # fmt: skip
    r = result_of(tmp_path / "text")
    assert r["completed"] == 3 and r["total_output_tokens"] == 12
    assert all(20 <= n <= 40 for n in r["input_lens"])  # 24 words ≈ 24 tokens, as the server counted them
    run_bench("multi-turn", "--gateway", cluster.gateway_address, "--prompt-format", "text", "--num-turns", "2", "--question-len", "12",
              "--output-len", "4", "--num-prompts", "1", "--out", str(tmp_path / "chat"), "--no-plots")  # fmt: skip
    r = result_of(tmp_path / "chat")
    assert r["completed"] == 2 and r["input_lens"][1] > r["input_lens"][0] + 12  # the second turn resends the first
