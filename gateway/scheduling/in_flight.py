"""In-flight requests: this gateway's own count of requests it sent to a worker and that have not
finished, counted at decision time.

The workers' load snapshots lag a decision by a step or more; a burst of requests sharing one hot
prefix would all see the warm worker idle and pile onto it. This count moves the instant a
request is routed, so the burst spreads once the warm worker holds a few more requests than the
others. The score is relative to the busiest candidate (1 − n / max n), so it only ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext


class InFlightScorer:
    name = "in-flight"

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        counts = [c.num_in_flight for c in candidates]
        busiest = max(counts, default=0)
        if busiest == 0:
            return [1.0] * len(candidates)
        return [1.0 - n / busiest for n in counts]
