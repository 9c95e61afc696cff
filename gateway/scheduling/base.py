"""What every routing plugin sees, and how filters, scorers and a picker make one decision.

    candidates ──► filter₁ … filterₖ (each drops the ones that must not take the request)
               ──► scorer₁ … scorerₙ (each: a score in [0, 1] per candidate)
               ──► Σ weightᵢ · scoreᵢ ──► picker ──► one candidate ──► scorers' on_picked

A candidate is a gateway WorkerHandle (registration, last load snapshot, in-flight count). The
request context carries the prompt's block hashes, computed once per request, so every scorer
that needs them shares one hashing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class RequestContext:
    request_id: str
    num_prompt_tokens: int
    block_hashes: list[int] = field(default_factory=list)  # the prompt's full blocks, chained
    block_size: int = 0  # tokens per block of those hashes (0: not hashed)
    model: str = ""  # the model asked for ("" = whatever the workers serve)
    session_id: str = ""  # the session header's value, when the client sent one
    _held: tuple | None = field(default=None, repr=False, compare=False)  # (index, worker ids, result)

    def held_blocks(self, index, candidates: Sequence) -> dict[str, int]:
        """index.match of this prompt against `candidates`: the leading run of its blocks each one
        holds. Computed once per candidate set and index, so every scorer of a decision shares one
        walk of the index (it does not change during a decision: both run on the event loop)."""
        if not self.block_hashes:
            return {}
        ids = tuple(c.worker_id for c in candidates)
        if self._held is None or self._held[0] is not index or self._held[1] != ids:
            self._held = (index, ids, index.match(self.block_hashes, ids))
        return self._held[2]


class Filter(Protocol):
    name: str

    def filter(self, ctx: RequestContext, candidates: Sequence) -> list:
        """The candidates that may take the request (a subset, order kept). Does not mutate."""


class Scorer(Protocol):
    name: str

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        """One score in [0, 1] per candidate, higher is better. Does not mutate."""


class Picker(Protocol):
    name: str

    def pick(self, candidates: Sequence, scores: list[float], rng: random.Random):
        """One candidate (None when there is none). Does not mutate."""


@dataclass
class Profile:
    """Filters, weighted scorers and a picker: one routing policy. A scorer of weight 0 is skipped."""

    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker

    @property
    def needs_block_hashes(self) -> bool:
        """Whether a plugin reads the prompt's block hashes (a plugin says so with a true
        `needs_block_hashes` attribute), so the gateway must hash the prompt before deciding.
        A listed scorer counts even at weight 0, so whether a policy hashes does not hang on its weights."""
        plugins = [*self.filters, *(scorer for scorer, _ in self.scorers), self.picker]
        return any(getattr(p, "needs_block_hashes", False) for p in plugins)

    def schedule(self, ctx: RequestContext, candidates: Sequence, rng: random.Random, observe=None):
        """The chosen candidate, or None. `observe(plugin name, seconds)` gets each plugin's time.
        Mutates only the scorers that remember decisions (session affinity), through on_picked."""
        for f in self.filters:
            t = time.perf_counter()
            candidates = f.filter(ctx, candidates)
            if observe is not None:
                observe(f.name, time.perf_counter() - t)
        if not candidates:
            return None
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            if weight == 0:
                continue
            t = time.perf_counter()
            for i, s in enumerate(scorer.score(ctx, candidates)):
                totals[i] += weight * s
            if observe is not None:
                observe(scorer.name, time.perf_counter() - t)
        t = time.perf_counter()
        chosen = self.picker.pick(candidates, totals, rng)
        if observe is not None:
            observe(self.picker.name, time.perf_counter() - t)
        if chosen is not None:
            for scorer, _ in self.scorers:
                on_picked = getattr(scorer, "on_picked", None)
                if on_picked is not None:
                    on_picked(ctx, chosen)
        return chosen
