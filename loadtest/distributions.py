"""Length and delay distributions, written on the command line as short specs.

    256                  fixed: always 256
    uniform:128:512      uniform integers in [128, 512] (both ends included)
    normal:256:64        normal with mean 256 and standard deviation 64, rounded
    exponential:128      exponential with mean 128, rounded
    lognormal:200:0.8    log-normal with median 200 and sigma 0.8 (of the log), rounded

Every sample is drawn from a numpy Generator the caller owns, so a workload built twice from the
same seed draws the same lengths. Integer samples are clipped to a minimum (lengths of 0 tokens
are never useful); `sample` returns floats for delays, where 0 is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("fixed", "uniform", "normal", "exponential", "lognormal")
_NUM_PARAMS = {"fixed": 1, "uniform": 2, "normal": 2, "exponential": 1, "lognormal": 2}


@dataclass(frozen=True)
class Distribution:
    kind: str
    a: float  # fixed: the value; uniform: low; normal: mean; exponential: mean; lognormal: median
    b: float = 0.0  # uniform: high; normal: std; lognormal: sigma

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"distribution kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError(f"{self} has a parameter that is not a finite number")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"{self}: uniform needs low <= high")
        if self.kind in ("normal", "lognormal") and self.b < 0:
            raise ValueError(f"{self}: the spread must be >= 0")
        if self.kind in ("exponential", "lognormal") and self.a <= 0:
            raise ValueError(f"{self}: the mean (or median) must be > 0")
        if self.a < 0:
            raise ValueError(f"{self}: negative values are not lengths or delays")

    @classmethod
    def parse(cls, spec: str | int | float) -> "Distribution":
        """'256', 'uniform:128:512', ... (see the module docstring); raises ValueError naming the spec."""
        text = str(spec).strip()
        parts = text.split(":")
        kind, params = ("fixed", parts) if len(parts) == 1 else (parts[0].lower(), parts[1:])
        if kind not in KINDS:
            raise ValueError(f"distribution {text!r}: kind must be one of {', '.join(KINDS)} (e.g. uniform:128:512)")
        if len(params) != _NUM_PARAMS[kind]:
            raise ValueError(f"distribution {text!r}: {kind} takes {_NUM_PARAMS[kind]} number(s) after the kind")
        try:
            values = [float(p) for p in params]
        except ValueError:
            raise ValueError(f"distribution {text!r}: parameters must be numbers") from None
        return cls(kind, *values)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.kind == "fixed":
            return num(self.a)
        if _NUM_PARAMS[self.kind] == 1:
            return f"{self.kind}:{num(self.a)}"
        return f"{self.kind}:{num(self.a)}:{num(self.b)}"

    @property
    def mean(self) -> float:
        """The expected value before rounding and clipping."""
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        return self.a

    def sample(self, rng: np.random.Generator) -> float:
        """One draw (a float, never negative). Advances rng."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return float(rng.uniform(self.a, self.b))
        if self.kind == "normal":
            return max(0.0, float(rng.normal(self.a, self.b)))
        if self.kind == "exponential":
            return float(rng.exponential(self.a))
        return float(rng.lognormal(math.log(self.a), self.b))

    def sample_int(self, rng: np.random.Generator, minimum: int = 1) -> int:
        """One draw rounded to an integer, at least `minimum`. Advances rng (except when fixed)."""
        if self.kind == "uniform":  # integers in [low, high], each end as likely as the middle
            low, high = math.ceil(self.a), math.floor(self.b)
            return max(minimum, int(rng.integers(low, high + 1)) if low <= high else round(self.a))
        return max(minimum, int(round(self.sample(rng))))


def with_range_ratio(dist: Distribution, ratio: float) -> Distribution:
    """vLLM's `--random-range-ratio`: a fixed length L becomes uniform over [L(1-r), L(1+r)]."""
    if not 0 <= ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return dist
    if dist.kind != "fixed":
        raise ValueError(f"--random-range-ratio applies to a fixed length, not to {dist}")
    return Distribution("uniform", math.floor(dist.a * (1 - ratio)), math.ceil(dist.a * (1 + ratio)))
