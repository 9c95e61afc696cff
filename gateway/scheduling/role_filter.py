"""Role filter: only workers of the role being scheduled (decode for generation, prefill for P/D)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import RequestContext


class RoleFilter:
    def __init__(self, role: str):
        self.role = role
        self.name = f"role-filter[{role}]"

    def filter(self, ctx: RequestContext, candidates: Sequence) -> list:
        return [c for c in candidates if c.role == self.role]
