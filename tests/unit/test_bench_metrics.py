"""The metric arithmetic on hand-made timelines, against the definitions of `vllm bench serve`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.metrics import SLO, compute_metrics, latency_stats, peak_concurrency, peak_output_throughput, per_request_arrays, percentile_key
from loadtest.timeline import RequestRecord


def rec(index=0, send=0.0, chunks=(), end=None, status="OK", prompt=10, cached=0, completion=None, warmup=False, usage=True) -> RequestRecord:
    """A finished request: `chunks` is ((time, tokens), ...); `end` defaults to the last chunk."""
    r = RequestRecord(index=index, request_id=f"r{index}", job=index, warmup=warmup, scheduled=send, expected_prompt_tokens=prompt)
    r.send = send
    r.chunk_times = [t for t, _ in chunks]
    r.chunk_tokens = [n for _, n in chunks]
    r.end = end if end is not None else (r.chunk_times[-1] if chunks else send)
    r.status = status
    if usage and status == "OK":
        r.prompt_tokens, r.cached_prompt_tokens = prompt, cached
        r.completion_tokens = completion if completion is not None else sum(r.chunk_tokens)
    return r


def test_ttft_itl_tpot_e2el_of_one_stream():
    r = rec(send=1.0, chunks=[(1.2, 1), (1.25, 1), (1.35, 1), (1.4, 1)])
    assert r.ttft == pytest.approx(0.2)
    assert r.itls == pytest.approx([0.05, 0.1, 0.05])
    assert r.e2el == pytest.approx(0.4)
    assert r.tpot == pytest.approx((0.4 - 0.2) / 3)  # excludes the first token


def test_tpot_divides_by_tokens_and_itl_is_per_chunk_when_chunks_carry_several_tokens():
    r = rec(send=0.0, chunks=[(0.1, 1), (0.3, 3), (0.4, 1)])
    assert r.num_output_tokens == 5
    assert r.itls == pytest.approx([0.2, 0.1])
    assert r.tpot == pytest.approx((0.4 - 0.1) / 4)


def test_server_reported_counts_win_over_what_the_client_counted():
    r = rec(chunks=[(0.1, 1), (0.2, 1)], prompt=10, completion=3)  # e.g. a held-back stop string
    r.prompt_tokens = 12  # the gateway's tokenizer says 12
    assert r.num_output_tokens == 3 and r.num_prompt_tokens == 12
    bare = rec(chunks=[(0.1, 1), (0.2, 2)], prompt=7, usage=False)
    assert bare.num_output_tokens == 3 and bare.num_prompt_tokens == 7


def test_one_token_stream_has_a_ttft_but_no_tpot_and_no_itl():
    r = rec(send=0.0, chunks=[(0.3, 1)], end=0.31)
    assert r.ttft == pytest.approx(0.3) and r.tpot is None and r.itls == []
    m = compute_metrics([r], duration=1.0)
    assert m["completed"] == 1 and m["total_output_tokens"] == 1
    assert m["mean_tpot_ms"] is None and m["mean_itl_ms"] is None and m["p99_tpot_ms"] is None
    assert m["mean_ttft_ms"] == pytest.approx(300.0) and m["mean_e2el_ms"] == pytest.approx(310.0)


def test_failed_and_cancelled_requests_count_as_failed_and_stay_out_of_latencies_and_tokens():
    ok = rec(0, send=0.0, chunks=[(0.1, 1), (0.2, 1)], prompt=10)
    partial = rec(1, send=0.0, chunks=[(0.05, 1)], end=0.5, status="UNAVAILABLE", prompt=10)  # died after a token
    cancelled = rec(2, send=0.0, chunks=[(0.01, 1)], end=0.6, status="CANCELLED", prompt=10)
    deadline = rec(3, send=0.0, end=2.0, status="DEADLINE_EXCEEDED", prompt=10)
    m = compute_metrics([ok, partial, cancelled, deadline], duration=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 1, 3)
    assert m["errors_by_status"] == {"CANCELLED": 1, "DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert m["total_input_tokens"] == 10 and m["total_output_tokens"] == 2
    assert m["mean_ttft_ms"] == pytest.approx(100.0) and m["median_e2el_ms"] == pytest.approx(200.0)
    assert m["request_throughput"] == pytest.approx(0.5)


def test_throughputs_divide_by_the_duration():
    records = [rec(i, send=0.1 * i, chunks=[(0.1 * i + 0.2, 1), (0.1 * i + 0.3, 3)], prompt=20) for i in range(4)]
    m = compute_metrics(records, duration=2.0)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(16 / 2.0)
    assert m["total_token_throughput"] == pytest.approx((80 + 16) / 2.0)


def test_percentiles_are_numpys_linear_ones_in_milliseconds_under_vllms_keys():
    records = [rec(i, send=0.0, chunks=[(t, 1), (t + 0.01, 1)]) for i, t in enumerate([0.01, 0.02, 0.03, 0.04])]
    m = compute_metrics(records, duration=1.0, percentiles=(50, 90, 99.9))
    assert m["median_ttft_ms"] == pytest.approx(25.0)
    assert m["p90_ttft_ms"] == pytest.approx(37.0)  # rank 0.9·3 = 2.7 → 30 + 0.7·10
    assert m["p99.9_ttft_ms"] == pytest.approx(float(np.percentile([10, 20, 30, 40], 99.9)))
    assert m["std_ttft_ms"] == pytest.approx(float(np.std([10, 20, 30, 40])))
    assert percentile_key(99) == "p99" and percentile_key(99.9) == "p99.9" and percentile_key(50.0) == "p50"


def test_itl_pools_every_gap_of_every_request():
    a = rec(0, chunks=[(0.1, 1), (0.2, 1), (0.4, 1)])
    b = rec(1, chunks=[(0.1, 1), (0.5, 1)])
    stats = compute_metrics([a, b], duration=1.0)
    assert stats["mean_itl_ms"] == pytest.approx(np.mean([100, 200, 400]))


def test_warmup_requests_are_left_out():
    warm = rec(0, chunks=[(5.0, 1), (6.0, 1)], warmup=True, prompt=100)
    measured = rec(1, chunks=[(0.1, 1), (0.2, 1)], prompt=10)
    m = compute_metrics([warm, measured], duration=1.0)
    assert m["num_requests"] == 1 and m["total_input_tokens"] == 10 and m["max_concurrent_requests"] == 1
    assert m["p99_ttft_ms"] == pytest.approx(100.0)
    assert per_request_arrays([warm, measured])["input_lens"] == [10]


def test_prefix_cache_hit_rate_weighs_by_prompt_tokens():
    records = [rec(0, chunks=[(0.1, 1)], prompt=100, cached=96), rec(1, chunks=[(0.1, 1)], prompt=300, cached=0)]
    m = compute_metrics(records, duration=1.0)
    assert m["total_cached_prompt_tokens"] == 96 and m["prefix_cache_hit_rate"] == pytest.approx(96 / 400)
    assert compute_metrics([rec(0, chunks=[(0.1, 1)], usage=False)], 1.0)["prefix_cache_hit_rate"] is None


def test_goodput_counts_requests_meeting_every_slo_inclusive():
    fast = rec(0, send=0.0, chunks=[(0.1, 1), (0.15, 1), (0.2, 1)])  # ttft 100, tpot 50, e2e 200
    slow_first = rec(1, send=0.0, chunks=[(0.3, 1), (0.35, 1)])  # ttft 300
    slow_tokens = rec(2, send=0.0, chunks=[(0.1, 1), (0.3, 1)])  # tpot 200
    one_token = rec(3, send=0.0, chunks=[(0.1, 1)])  # tpot counted as 0 (vLLM)
    failed = rec(4, send=0.0, end=0.01, status="INTERNAL")
    slo = SLO.parse("ttft=100,tpot=50")
    m = compute_metrics([fast, slow_first, slow_tokens, one_token, failed], duration=2.0, slo=slo)
    assert m["request_goodput"] == pytest.approx(2 / 2.0)  # fast and one_token
    assert compute_metrics([fast], 1.0)["request_goodput"] is None
    assert not SLO(e2el_ms=199).met_by(fast) and SLO(e2el_ms=200).met_by(fast)


def test_slo_spellings_and_mistakes():
    assert SLO.parse("ttft=500,tpot=50,e2e=2s") == SLO(500, 50, 2000)
    assert SLO.parse("ttft:500 e2el:1000ms") == SLO(ttft_ms=500, e2el_ms=1000)  # vLLM's --goodput spelling
    for bad in ("", "ttft", "itl=5", "ttft=fast"):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_nothing_completed_gives_none_statistics_not_zeros():
    m = compute_metrics([rec(0, end=0.5, status="UNAVAILABLE")], duration=1.0, metrics=("ttft", "tpot", "itl", "e2el", "ntpot"))
    assert m["completed"] == 0 and m["request_throughput"] == 0
    assert all(m[f"mean_{k}_ms"] is None for k in ("ttft", "tpot", "itl", "e2el", "ntpot"))
    assert m["max_output_tokens_per_s"] == 0 and m["max_concurrent_requests"] == 0


def test_ntpot_is_e2e_over_all_output_tokens():
    r = rec(send=0.0, chunks=[(0.2, 1), (0.4, 3)])
    assert compute_metrics([r], 1.0, metrics=("ntpot",))["mean_ntpot_ms"] == pytest.approx(400 / 4)


def test_peaks_count_tokens_per_whole_second_and_overlapping_requests():
    a = rec(0, send=0.0, chunks=[(0.5, 2), (0.9, 3), (1.5, 1)])
    b = rec(1, send=0.6, chunks=[(0.95, 4), (1.1, 1)])
    c = rec(2, send=1.5, chunks=[(1.7, 1)])  # starts exactly when a ends: not overlapping
    assert peak_output_throughput([a, b, c]) == 9  # second [0, 1): 2 + 3 + 4
    assert peak_concurrency([a, b, c]) == 2


def test_latency_stats_and_bad_arguments():
    assert latency_stats("x", [0.001, 0.003], [50])["p50_x_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        compute_metrics([], duration=0)
    with pytest.raises(ValueError):
        compute_metrics([], duration=math.inf)
    with pytest.raises(ValueError):
        compute_metrics([], duration=1.0, metrics=("latency",))


def test_per_request_arrays_follow_vllms_names_and_send_order():
    ok = rec(1, send=0.5, chunks=[(0.7, 1), (0.8, 1)])
    bad = rec(0, send=0.0, end=0.1, status="UNAVAILABLE")
    bad.error = "no worker"
    arrays = per_request_arrays([ok, bad])
    assert arrays["errors"] == ["no worker", ""] and arrays["output_lens"] == [0, 2]
    assert arrays["ttfts"][0] is None and arrays["ttfts"][1] == pytest.approx(0.2)
    assert arrays["itls"] == [[], pytest.approx([0.1])] and arrays["statuses"] == ["UNAVAILABLE", "OK"]
