"""Admission (gateway/admission.py): the gateway's own limit on requests in flight, and its count
given back however a request ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.admission import Admission
from services.common.errors import RequestError
from services.common.metrics import GatewayMetrics


def sample(metrics: GatewayMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_past_the_limit_is_resource_exhausted_and_counted():
    metrics = GatewayMetrics()
    admission = Admission(2, metrics)
    with admission.admit(), admission.admit():
        assert admission.num_in_flight == 2 and sample(metrics, "tandem_requests_in_flight") == 2
        with pytest.raises(RequestError) as e, admission.admit():
            pass
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_requests_in_flight" in str(e.value)
        assert admission.num_in_flight == 2  # the refused request took no place
    assert sample(metrics, "tandem_requests_total", code="RESOURCE_EXHAUSTED") == 1
    assert admission.num_in_flight == 0 and sample(metrics, "tandem_requests_in_flight") == 0
    with admission.admit():  # room again
        pass


def test_zero_is_no_limit():
    admission = Admission(0, GatewayMetrics())
    with admission.admit(), admission.admit(), admission.admit():
        assert admission.num_in_flight == 3


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError, match="max_requests_in_flight"):
        Admission(-1, GatewayMetrics())


def test_an_error_gives_the_place_back():
    admission = Admission(1, GatewayMetrics())
    with pytest.raises(RequestError), admission.admit():
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "no decode worker")
    assert admission.num_in_flight == 0


async def test_a_cancelled_request_gives_the_place_back():
    metrics = GatewayMetrics()
    admission = Admission(1, metrics)
    entered = asyncio.Event()

    async def request():
        with admission.admit():
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(request())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.num_in_flight == 0 and sample(metrics, "tandem_requests_in_flight") == 0
