"""Prometheus metrics. Workers use vLLM's metric names so existing vLLM dashboards work unchanged;
the gateway's metrics are tandem_*. Each process owns one registry (no module-level globals), served
over HTTP on the service's metrics port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# vLLM's buckets for request latencies (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class MetricsServer:
    """The /metrics HTTP endpoint for one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._server = None
        self._thread = None

    def start(self, host: str, port: int) -> None:
        if port:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


class WorkerMetrics:
    """vLLM-compatible worker metrics, labelled with model_name."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.num_requests_running = Gauge("vllm:num_requests_running", "Requests in model execution batches", labels, registry=r).labels(model_name)
        self.num_requests_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed", labels, registry=r).labels(model_name)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent", labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed", labels, registry=r).labels(model_name)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r).labels(model_name)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels, registry=r).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Finished requests", labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, buckets=TTFT_BUCKETS, registry=r).labels(
            model_name
        )
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", labels, buckets=ITL_BUCKETS, registry=r).labels(
            model_name
        )
        self.e2e_request_latency = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", labels, buckets=E2E_BUCKETS, registry=r).labels(
            model_name
        )

        # KV transfer (Tandem's own names: vLLM has no disaggregation metrics of this shape)
        self.kv_pull_blocks = Counter("tandem_kv_pull_blocks", "KV blocks pulled from prefill workers", registry=r)
        self.kv_pull_bytes = Counter("tandem_kv_pull_bytes", "KV bytes pulled from prefill workers", registry=r)
        self.kv_pull_seconds = Histogram(
            "tandem_kv_pull_seconds", "Duration of one KV pull", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r
        )
        self.kv_pulls = Counter("tandem_kv_pulls", "KV pulls that landed, by path: local (read from the prefill worker's memory on this host) or messages "
                                "(UCX messages: another host, or the kernel refused the local read)", ["path"], registry=r)  # fmt: skip
        self.kv_channel_pulls = Counter("tandem_kv_channel_pulls", "KV pulls of path=local requested over the prefill worker's same-host channel "
                                        "(a Unix socket) instead of UCX messages", registry=r)  # fmt: skip
        self.kv_pull_failures = Counter("tandem_kv_pull_failures", "KV pulls that failed (then recomputed or failed, per policy)", registry=r)
        self.kv_leases_expired = Counter("tandem_kv_leases_expired", "Prefilled prompts freed because no decode worker pulled them in time", registry=r)
        self.kv_pull_requests_dropped = Counter("tandem_kv_pull_requests_dropped", "KV pull requests dropped unanswered: unknown token, a token "
                                                "presented by a peer it was not issued to, or too many at once", registry=r)  # fmt: skip

    def record_finished(self, finish_reason: str, num_prompt: int, num_cached: int) -> None:
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.prompt_tokens.inc(num_prompt - num_cached)
        self.prefix_cache_queries.inc(num_prompt)
        self.prefix_cache_hits.inc(num_cached)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_requests", "Generate requests by final gRPC status", ["code"], registry=r)
        self.http_requests = Counter(
            "tandem_http_requests",
            "OpenAI HTTP API requests, by route and HTTP status (a request of several prompts is one here, one per prompt in tandem_requests)",
            ["route", "status"],
            registry=r,
        )
        self.decisions = Counter("tandem_routing_decisions", "Requests routed, by worker and policy", ["worker_id", "policy"], registry=r)
        self.workers = Gauge("tandem_workers", "Workers known from etcd", ["role"], registry=r)
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests being served", registry=r)
        self.prefix_hit_ratio = Histogram(
            "tandem_prefix_hit_ratio", "Cached prompt tokens / prompt tokens, per request", buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0), registry=r
        )
        self.time_to_first_token = Histogram("tandem_time_to_first_token_seconds", "Time to first token at the gateway", buckets=TTFT_BUCKETS, registry=r)
        self.request_duration = Histogram("tandem_request_duration_seconds", "Generate duration at the gateway", buckets=E2E_BUCKETS, registry=r)
        self.pd_decisions = Counter(
            "tandem_pd_decisions", "P/D decisions, by outcome (disaggregated, below-threshold, prefill-unavailable, forced-*)", ["reason"], registry=r
        )
        self.worker_ejections = Counter(
            "tandem_worker_ejections",
            "Workers ejected from routing by outlier detection (consecutive failed calls), by worker and role",
            ["worker_id", "role"],
            registry=r,
        )
        self.worker_retries = Counter(
            "tandem_worker_retries",
            "Requests sent to another worker after one failed, by leg (prefill, decode) and phase (before-first-token, migration, fallback-aggregated)",
            ["leg", "phase"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "tandem_scheduling_decision_seconds",
            "Time to choose a request's workers (decode pick and P/D decision)",
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2),
            registry=r,
        )
        self.plugin_latency = Histogram(
            "tandem_scheduler_plugin_duration_seconds",
            "Time spent in each routing plugin",
            ["plugin"],
            buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2),
            registry=r,
        )
