"""Admission: the first step of the request path — may the gateway take one more request?

    requests in flight < max_requests_in_flight (0 = no limit)  → admitted, counted until it ends
    otherwise                                                  → RESOURCE_EXHAUSTED, counted in
                                                                 tandem_requests{code=...} at once

The count is the gateway's own (both front doors together), not a worker's: it bounds the memory
and tasks one gateway holds. Workers' counts are WorkerHandle.in_flight (gateway/worker_pool.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from services.common.errors import RequestError


class Admission:
    """Counts the requests this gateway serves (tandem_requests_in_flight) and turns away those
    past the limit. Event-loop only."""

    def __init__(self, max_requests_in_flight: int, metrics):
        if max_requests_in_flight < 0:
            raise ValueError(f"max_requests_in_flight must be >= 0 (0 = no limit), got {max_requests_in_flight}")
        self.limit = max_requests_in_flight
        self.metrics = metrics
        self.num_in_flight = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place for one request while the block runs; released however it ends (an error,
        a cancellation, a generator closed early). Raises RequestError(RESOURCE_EXHAUSTED) when the
        gateway is full, having counted the refusal (the block's own outcome is its caller's)."""
        if self.limit and self.num_in_flight >= self.limit:
            self.metrics.requests.labels(grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the gateway is serving its limit of {self.limit} requests (max_requests_in_flight); retry later"
            )
        self.num_in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            self.metrics.in_flight.dec()
