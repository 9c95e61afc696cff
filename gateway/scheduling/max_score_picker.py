"""The candidate with the highest score; ties are broken at random (so equal workers share load)."""

from __future__ import annotations

import random
from collections.abc import Sequence


class MaxScorePicker:
    name = "max-score"

    def pick(self, candidates: Sequence, scores: list[float], rng: random.Random):
        if not candidates:
            return None
        best = max(scores)
        return rng.choice([c for c, s in zip(candidates, scores) if s >= best - 1e-9])
