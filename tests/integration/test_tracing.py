"""One request, one trace: spans from the gateway, the tokenizer and the decode worker share its id."""

from __future__ import annotations

import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow


def test_one_trace_covers_gateway_tokenizer_and_worker(gateway_channel, otlp_collector):
    request_id = "trace-me-0001"
    request = gateway_pb2.GenerateRequest(request_id=request_id, text="Tracing test prompt", sampling=common_pb2.SamplingParams(max_tokens=4))
    list(gateway_pb2_grpc.GatewayStub(gateway_channel).Generate(request, timeout=60))

    engine_span = wait_for(
        lambda: next((s for s in otlp_collector.snapshot() if s.name == "engine.generate" and s.attributes.get("tandem.request_id") == request_id), None),
        "the decode worker's engine span",
    )
    trace_id = engine_span.trace_id

    expected = {
        ("tandem-gateway", "/tandem.v1.Gateway/Generate"),  # the gateway's server span: the root
        ("tandem-gateway", "/tandem.v1.Tokenizer/Tokenize"),  # its client calls
        ("tandem-gateway", "/tandem.v1.Decode/Generate"),
        ("tandem-gateway", "gateway.schedule"),  # the decode pick and the P/D decision
        ("tandem-tokenizer", "/tandem.v1.Tokenizer/Tokenize"),
        ("tandem-decode", "/tandem.v1.Decode/Generate"),
        ("tandem-decode", "engine.generate"),
    }

    def names_in_trace():
        names = {(s.service, s.name) for s in otlp_collector.spans_of_trace(trace_id)}
        return names if expected <= names else None

    # streaming spans end (and are exported) when their stream does: wait for all of them
    wait_for(names_in_trace, "the gateway, tokenizer and decode spans in one trace")
    spans = otlp_collector.spans_of_trace(trace_id)
    # the spans form one tree: every parent is in the trace, and there is one root
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "tandem-gateway"
    assert all(s.parent_span_id in ids for s in spans if s.parent_span_id)
