"""When requests are sent: an open-loop arrival process, as `vllm bench serve` defines it.

The gaps between arrivals are gamma-distributed with shape = burstiness and mean = 1 / rate:

    burstiness 1      exponential gaps: a Poisson process (vLLM's default)
    burstiness < 1    burstier: the same mean rate in clumps (coefficient of variation 1/√b > 1)
    burstiness > 1    more regular; burstiness = inf sends at a constant rate (gap = 1/rate)
    rate = inf        every request at once (offsets all 0); the concurrency limit, if any, paces them

Offsets are cumulative seconds from the start of the run, the first one a gap after 0 (so N
arrivals span N gaps, as in vLLM). Unlike vLLM we do not rescale the offsets so that a fixed
number of requests ends exactly at N / rate: the process is an endless stream here (runs may be
limited by duration), and rescaling would make the gaps depend on how many requests follow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalProcess:
    rate: float = math.inf  # requests per second
    burstiness: float = 1.0  # gamma shape

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"request rate must be > 0 (inf = all at once), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0 (1 = Poisson, inf = constant rate), got {self.burstiness}")

    @property
    def name(self) -> str:
        if math.isinf(self.rate):
            return "all at once"
        if math.isinf(self.burstiness):
            return "constant rate"
        return "Poisson process" if self.burstiness == 1 else f"gamma arrivals (burstiness {self.burstiness:g})"

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        """Endless seconds between consecutive arrivals. Advances rng (except for a constant rate)."""
        if math.isinf(self.rate):
            while True:
                yield 0.0
        if math.isinf(self.burstiness):
            while True:
                yield 1.0 / self.rate
        scale = 1.0 / (self.rate * self.burstiness)
        while True:
            # drawn in batches: one numpy call per 256 arrivals instead of one each
            yield from rng.gamma(shape=self.burstiness, scale=scale, size=256).tolist()

    def offsets(self, rng: np.random.Generator) -> Iterator[float]:
        """Endless arrival times, seconds from the start, non-decreasing. Advances rng."""
        t = 0.0
        for gap in self.gaps(rng):
            t += gap
            yield t
