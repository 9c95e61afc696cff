"""Health filter: only workers that can take a request now.

A worker is healthy while its Worker.Watch stream is connected (the gateway sees a SIGKILLed
worker at once, when the stream breaks) and it has not left etcd (a draining worker revoked its
lease; requests already on it finish, new ones go elsewhere). A call that failed with UNAVAILABLE
marks the worker unconnected until its stream answers again, and a worker whose calls keep failing
is out while outlier detection ejects it (its `ejected_until` is in the future; candidates without
one, such as simulated workers, are never ejected).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .base import RequestContext


class HealthFilter:
    name = "health-filter"

    def filter(self, ctx: RequestContext, candidates: Sequence) -> list:
        now = time.monotonic()
        return [c for c in candidates if c.connected and not c.retired and getattr(c, "ejected_until", 0.0) <= now]
