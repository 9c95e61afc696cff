"""`tandem bench --backend openai`: the same workloads and metrics over the OpenAI HTTP API.

Against Tandem's own gateway, so the HTTP run can be checked against the gRPC run of the same
workload: equal token counts, equal output tokens, cached prompt tokens from
usage.prompt_tokens_details, HTTP errors recorded under their status, and a missing server
reported in one line.
"""

from __future__ import annotations

import json

import pytest

from loadtest.bench_cli import main as bench
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

TINY_VOCAB = "384"  # tests/helpers/tiny_models.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama):
    with running_cluster(tmp_path_factory.mktemp("bench-http"), model=str(tiny_llama), tokenizer=False, num_prefill=0, num_decode=1) as c:
        yield c


def run(*argv: str) -> dict:
    out = argv[argv.index("--out") + 1]
    assert bench([*argv, "--no-progress", "--no-plots"]) == 0
    with open(f"{out}/result.json") as f:
        return json.load(f)


def requests_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]


def test_http_and_grpc_runs_of_one_workload_agree(tiny, tmp_path):
    workload = ["random", "--vocab-size", TINY_VOCAB, "--input-len", "20", "--output-len", "6", "--num-prompts", "5", "--max-concurrency", "2"]
    http = run(*workload, "--backend", "openai", "--base-url", tiny.gateway_http_url, "--out", str(tmp_path / "http"))
    grpc = run(*workload, "--gateway", tiny.gateway_address, "--out", str(tmp_path / "grpc"))
    assert (http["completed"], http["failed"]) == (grpc["completed"], grpc["failed"]) == (5, 0)
    assert http["total_input_tokens"] == grpc["total_input_tokens"] == 100 and http["total_output_tokens"] == grpc["total_output_tokens"] == 30
    assert http["target"]["kind"] == "openai" and http["model_id"] == grpc["model_id"]
    for r in requests_of(tmp_path / "http"):
        assert sum(r["chunk_tokens"]) == 6 and r["finish_reason"] == "length" and r["status"] == "OK"
    assert http["median_ttft_ms"] > 0 and len(http["itls"]) == 5


def test_http_shared_prefix_reports_cached_tokens(tiny, tmp_path):
    r = run("shared-prefix", "--backend", "openai", "--base-url", tiny.gateway_http_url, "--vocab-size", TINY_VOCAB, "--num-groups", "1",
            "--prompts-per-group", "3", "--system-prompt-len", "32", "--question-len", "4", "--output-len", "2", "--max-concurrency", "1",
            "--out", str(tmp_path / "shared"))  # fmt: skip
    cached = [x["cached_prompt_tokens"] for x in requests_of(tmp_path / "shared")]
    assert r["completed"] == 3 and cached[0] == 0 and cached[1:] == [32, 32]


def test_without_token_ids_each_text_event_counts_as_one_token(cluster, tmp_path):
    """As against a server without vLLM's return_token_ids: the default model, whose output has text."""
    r = run("random", "--backend", "openai", "--base-url", cluster.gateway_http_url, "--no-return-token-ids", "--prompt-format", "text",
            "--input-len", "8", "--output-len", "5", "--num-prompts", "2", "--out", str(tmp_path / "noids"))  # fmt: skip
    assert r["completed"] == 2 and r["total_output_tokens"] == 10  # from usage.completion_tokens
    for x in requests_of(tmp_path / "noids"):
        assert 1 <= len(x["chunk_times"]) <= 5 and set(x["chunk_tokens"]) == {1}


def test_http_errors_are_recorded_under_their_status(tiny, tmp_path, capsys):
    # 2,000-token prompts do not fit the tiny model's 1,024-token context: every request is a 400
    assert bench(["random", "--backend", "openai", "--base-url", tiny.gateway_http_url, "--vocab-size", TINY_VOCAB, "--input-len", "2000",
                  "--output-len", "2", "--num-prompts", "2", "--out", str(tmp_path / "bad"), "--no-progress", "--no-plots"]) == 1  # fmt: skip
    records = requests_of(tmp_path / "bad")
    assert [r["status"] for r in records] == ["INVALID_ARGUMENT"] * 2
    assert all(r["error"].startswith("HTTP 400:") and "2000 tokens" in r["error"] for r in records)


def test_no_server_at_the_base_url_fails_fast_in_one_line(capsys):
    assert bench(["random", "--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--connect-timeout", "1", "--num-prompts", "1", "--no-progress"]) == 1
    assert "no OpenAI-compatible server answers at http://127.0.0.1:1/v1" in capsys.readouterr().err
