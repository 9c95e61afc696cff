"""Queue depth: fewer requests on a worker score higher, falling to 0 at `saturation` requests.

A worker's count is the larger of what it last reported (running + waiting, every gateway's
requests) and what this gateway has in flight there, counted at decision time. The score is
absolute (1 − depth / saturation), not relative to the other candidates, so with the weights of
the prefix-aware policy a burst sharing one hot prefix stays on the warm worker until it holds a
few more requests than an idle one, and then spreads.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext
from .worker_load import worker_load


class QueueDepthScorer:
    name = "queue-depth"

    def __init__(self, saturation: int = 8):
        if saturation < 1:
            raise ValueError(f"saturation must be >= 1, got {saturation}")
        self.saturation = saturation

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        return [max(0.0, 1.0 - worker_load(c)[0] / self.saturation) for c in candidates]
