"""Round-robin: each candidate in turn, in worker-id order (the `round-robin` policy, a baseline).

The turn is the picker's only state. The router keeps one picker across reconfigurations, so a
live config change does not restart the rotation; workers joining or leaving shift it, as any
round-robin over a changing set does.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence


class RoundRobinPicker:
    name = "round-robin"

    def __init__(self):
        self._turn = itertools.count()

    def pick(self, candidates: Sequence, scores: list[float], rng: random.Random):
        """The next candidate in worker-id order, or None. Mutates: advances the turn."""
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda c: c.worker_id)  # a stable order to turn through
        return ordered[next(self._turn) % len(ordered)]
