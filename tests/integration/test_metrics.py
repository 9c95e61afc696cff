"""Prometheus /metrics: workers under vLLM's names, the gateway under tandem_*; both move with traffic."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow


def scrape(cluster, name: str) -> dict[str, float]:
    """sample name{labels} → value, summed over label sets."""
    svc = cluster.service(name)
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name] = samples.get(s.name, 0.0) + s.value
    return samples


def test_worker_and_gateway_metrics_count_a_request(cluster, gateway_channel):
    before_decode, before_gateway = scrape(cluster, "decode-0"), scrape(cluster, "gateway")
    request = gateway_pb2.GenerateRequest(text="Metrics check", sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True))
    list(gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(request, timeout=60))
    with pytest.raises(grpc.RpcError):
        list(gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(gateway_pb2.GenerateRequest(text=""), timeout=10))
    decode, gw = scrape(cluster, "decode-0"), scrape(cluster, "gateway")

    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in decode, name
    assert decode["vllm:generation_tokens_total"] - before_decode.get("vllm:generation_tokens_total", 0) == 3
    assert decode["vllm:request_success_total"] - before_decode.get("vllm:request_success_total", 0) == 1
    assert decode["vllm:time_to_first_token_seconds_count"] - before_decode.get("vllm:time_to_first_token_seconds_count", 0) == 1
    assert decode["vllm:inter_token_latency_seconds_count"] - before_decode.get("vllm:inter_token_latency_seconds_count", 0) == 2
    assert decode["vllm:num_requests_running"] == 0

    assert gw["tandem_requests_total"] - before_gateway.get("tandem_requests_total", 0) == 2  # one OK, one INVALID_ARGUMENT
    assert gw["tandem_routing_decisions_total"] - before_gateway.get("tandem_routing_decisions_total", 0) == 1
    assert gw["tandem_workers"] >= 3  # tokenizer, prefill, decode
    assert "tandem_scheduler_plugin_duration_seconds_count" in gw and "tandem_prefix_hit_ratio_count" in gw
