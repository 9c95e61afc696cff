"""Health filter: only workers that can take a request now.

A worker is healthy while its Worker.Watch stream is connected (the gateway sees a SIGKILLed
worker at once, when the stream breaks) and it has not left etcd (a draining worker revoked its
lease; requests already on it finish, new ones go elsewhere). A call that failed with UNAVAILABLE
marks the worker unconnected until its stream answers again.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext


class HealthFilter:
    name = "health-filter"

    def filter(self, ctx: RequestContext, candidates: Sequence) -> list:
        return [c for c in candidates if c.connected and not c.retired]
