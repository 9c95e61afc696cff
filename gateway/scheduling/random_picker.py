"""Random: any candidate, uniformly, whatever the scores (the `random` policy, a baseline)."""

from __future__ import annotations

import random
from collections.abc import Sequence


class RandomPicker:
    name = "random"

    def pick(self, candidates: Sequence, scores: list[float], rng: random.Random):
        if not candidates:
            return None
        return rng.choice(list(candidates))
