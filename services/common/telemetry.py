"""OpenTelemetry tracing for every service: one trace per request across all hops.

W3C trace context travels in gRPC metadata: the server interceptor continues the caller's trace
and the client interceptors inject the current one, so a request's spans at the gateway, the
tokenizer and the workers share one trace id. Spans are exported by OTLP/gRPC when
OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard OTEL_* variables tune the exporter and the batch
processor); otherwise they are created and dropped, which costs almost nothing.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

TRACER_NAME = "tandem"


def setup_tracing(service_name: str) -> TracerProvider:
    """Install this process's tracer provider (once, at startup) and return it for shutdown()."""
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def server_interceptors() -> list:
    """Interceptors for grpc.aio.server: continue the caller's trace in a server span per RPC."""
    return [aio_server_interceptor()]


def client_interceptors() -> list:
    """Interceptors for grpc.aio channels: a client span per call, context injected into metadata."""
    return aio_client_interceptors()
