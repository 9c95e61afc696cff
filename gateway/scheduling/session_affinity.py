"""Session affinity: a request carrying a session id goes back to the worker that served the
session last (its conversation's KV is there), scoring 1 for that worker and 0 for the others.

The session id comes from a request header (`session_header` in the scheduling config, default
`x-session-id`). Precise prefix affinity usually finds the same worker on its own; this covers
what the index cannot see yet (the previous turn's blocks still being written) and clients that
salt or rewrite their prompts. The table is bounded: the least recently used sessions are
forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .base import RequestContext


class SessionAffinityScorer:
    name = "session-affinity"

    def __init__(self, max_sessions: int = 100_000):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self._worker_of: OrderedDict[str, str] = OrderedDict()  # session id → worker id, LRU first

    def __len__(self) -> int:
        return len(self._worker_of)

    def score(self, ctx: RequestContext, candidates: Sequence) -> list[float]:
        wid = self._worker_of.get(ctx.session_id) if ctx.session_id else None
        return [1.0 if c.worker_id == wid else 0.0 for c in candidates]

    def on_picked(self, ctx: RequestContext, chosen) -> None:
        """Remember the session's worker. Mutates."""
        if not ctx.session_id:
            return
        self._worker_of[ctx.session_id] = chosen.worker_id
        self._worker_of.move_to_end(ctx.session_id)
        while len(self._worker_of) > self.max_sessions:
            self._worker_of.popitem(last=False)

    def check_integrity(self) -> None:
        assert len(self._worker_of) <= self.max_sessions, f"{len(self._worker_of)} sessions over the bound {self.max_sessions}"
