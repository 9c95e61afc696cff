"""Model filter: only workers serving the model the request names (any, when it names none)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext


class ModelFilter:
    name = "model-filter"

    def filter(self, ctx: RequestContext, candidates: Sequence) -> list:
        if not ctx.model:
            return list(candidates)
        return [c for c in candidates if c.registration.model == ctx.model]
