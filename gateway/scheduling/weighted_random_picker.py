"""Weighted random: a candidate with probability proportional to its score.

Max-score sends every request of a hot prefix to the one best worker until its load tips the
scores; weighted random spreads them in proportion instead, trading some cache hits for balance
(useful when many gateways decide at once from the same view). All-zero scores pick uniformly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class WeightedRandomPicker:
    name = "weighted-random"

    def pick(self, candidates: Sequence, scores: list[float], rng: random.Random):
        if not candidates:
            return None
        weights = [max(0.0, s) for s in scores]
        if sum(weights) <= 0:
            return rng.choice(list(candidates))
        return rng.choices(list(candidates), weights=weights, k=1)[0]
