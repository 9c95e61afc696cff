"""Arrival processes: rate and burstiness within statistical tolerance, seeded, and the edge cases.

Tolerances are several standard errors wide at these sample sizes, and the seeds are fixed, so the
tests are deterministic; a wrong scale or shape (e.g. mean gap 1/(rate·b) instead of 1/rate) misses
by far more."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from loadtest.arrivals import ArrivalProcess

N = 20_000


def gaps(process: ArrivalProcess, n: int = N, seed: int = 0) -> np.ndarray:
    return np.array(list(itertools.islice(process.gaps(np.random.default_rng(seed)), n)))


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_gaps_have_mean_one_over_rate_and_cv_one(rate):
    g = gaps(ArrivalProcess(rate, 1.0))
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)  # standard error of the mean: 0.7%
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.04)
    assert (g > 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_keeps_the_rate_and_sets_the_coefficient_of_variation(burstiness):
    rate = 10.0
    g = gaps(ArrivalProcess(rate, burstiness))
    assert g.mean() == pytest.approx(1 / rate, rel=0.04)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_burstier_arrivals_clump_more_in_windows():
    """Counts per 1 s window at 20 req/s: Poisson variance ≈ mean; bursty far above; regular below."""

    def window_variance(b: float) -> float:
        t = np.cumsum(gaps(ArrivalProcess(20.0, b)))
        counts = np.bincount(t.astype(int))[:-1]
        return counts.var() / counts.mean()

    assert window_variance(1.0) == pytest.approx(1.0, abs=0.15)
    assert window_variance(0.1) > 5
    assert window_variance(10.0) < 0.3


def test_count_in_a_window_matches_the_rate():
    offsets = ArrivalProcess(20.0).offsets(np.random.default_rng(1))
    n = sum(1 for _ in itertools.takewhile(lambda t: t < 500.0, offsets))
    assert n == pytest.approx(20 * 500, rel=0.04)  # Poisson: σ = √10000 = 1%


def test_constant_rate_and_all_at_once():
    assert gaps(ArrivalProcess(4.0, math.inf), 10).tolist() == [0.25] * 10
    assert gaps(ArrivalProcess(math.inf), 10).tolist() == [0.0] * 10
    assert ArrivalProcess(4.0, math.inf).name == "constant rate" and ArrivalProcess().name == "all at once"


def test_offsets_accumulate_the_gaps_starting_one_gap_in():
    p = ArrivalProcess(5.0, 0.5)
    g = gaps(p, 50, seed=3)
    o = list(itertools.islice(p.offsets(np.random.default_rng(3)), 50))
    assert o == pytest.approx(np.cumsum(g).tolist())
    assert o[0] > 0 and all(b >= a for a, b in zip(o, o[1:]))


def test_seeded_and_reproducible():
    p = ArrivalProcess(3.0, 0.7)
    assert gaps(p, 1000, seed=42).tolist() == gaps(p, 1000, seed=42).tolist()
    assert gaps(p, 1000, seed=42).tolist() != gaps(p, 1000, seed=43).tolist()


@pytest.mark.parametrize("rate, burstiness", [(0, 1), (-1, 1), (1, 0), (1, -2), (math.nan, 1)])
def test_bad_rate_or_burstiness_is_refused(rate, burstiness):
    with pytest.raises(ValueError):
        ArrivalProcess(rate, burstiness)
