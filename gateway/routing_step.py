"""Route: which decode worker serves the request, and does a prefill worker compute its prompt first?

    hash the prompt's blocks (only when a scorer or the P/D decider will look them up)
    → routing policy picks a decode worker (filters → scorers → picker; UNAVAILABLE when none fits)
    → P/D decider (gateway/pd_decider.py): disaggregate on a prefill worker, or serve aggregated

Timed (tandem_decision_latency, per-plugin latency), counted (tandem_pd_decisions) and traced
(span gateway.schedule). Mutates nothing but the router's session table and the metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvtransfer.block_hash import hash_blocks
from protos.tandem.v1 import gateway_pb2
from services.common.errors import unavailable
from services.common.telemetry import tracer

from .pd_decider import PDDecision, decide
from .scheduling.base import RequestContext


@dataclass(frozen=True)
class Route:
    ctx: RequestContext  # what the scheduler knows of the request (the decode leg routes again with it)
    decode: object  # the decode worker's handle
    decision: PDDecision

    @property
    def num_backlog_tokens(self) -> int:
        """The prompt tokens the decode worker computes itself: counted in its prefill backlog
        until the first token (a disaggregated request's prompt is the prefill worker's)."""
        return 0 if self.decision.disaggregate else self.decision.num_uncached_tokens


class RoutingStep:
    """Routes requests over the pool's workers with the router (routing policy, P/D threshold)."""

    def __init__(self, pool, router, metrics):
        self.pool, self.router, self.metrics = pool, router, metrics

    def route(self, request: gateway_pb2.GenerateRequest, request_id: str, prompt_ids: list[int], decoders, metadata: dict) -> Route:
        """The decode worker and P/D decision for the request. `decoders`: the registered decode
        workers (not empty); `metadata`: the call's metadata (the session header). Raises
        RequestError(UNAVAILABLE) when no decode worker, or no forced prefill worker, can take it."""
        ctx = self._context(request, request_id, prompt_ids, decoders, metadata)
        decode, decision = self._schedule(request.mode, ctx)
        return Route(ctx, decode, decision)

    def observe_plugin(self, plugin: str, seconds: float) -> None:
        self.metrics.plugin_latency.labels(plugin).observe(seconds)

    def _context(self, request, request_id: str, prompt_ids: list[int], decoders, metadata: dict) -> RequestContext:
        """What the scheduler needs to know of the request. The prompt's block hashes (hashed as
        the workers do: their model id, block size and the cache salt) when the routing policy or
        the P/D decider will look them up in the prefix index."""
        session = metadata.get(self.router.config.session_header, "")
        ctx = RequestContext(request_id, len(prompt_ids), model=request.model, session_id=session if isinstance(session, str) else "")
        may_disaggregate = request.mode != gateway_pb2.SERVING_MODE_AGGREGATED and bool(self.pool.registered("prefill"))
        if self.router.needs_block_hashes or may_disaggregate:
            layout = decoders[0].registration.kv_layout
            if layout.block_size:
                ctx.block_hashes = hash_blocks(prompt_ids, layout.block_size, layout.model_id, request.cache_salt or None)
                ctx.block_size = layout.block_size
        return ctx

    def _schedule(self, mode: int, ctx: RequestContext):
        """The decode worker (routing policy) and the P/D decision for it, timed and traced."""
        observe = self.observe_plugin
        with tracer().start_as_current_span("gateway.schedule") as span:
            t = time.perf_counter()
            workers = self.pool.workers.values()
            decode = self.router.pick(ctx, workers, observe=observe)
            if decode is None:
                raise unavailable(
                    f"no decode worker can take the request ({len(self.pool.registered('decode'))} registered, none ready for model {ctx.model or 'any'})"
                )
            decision = decide(mode, ctx, decode, workers, self.router, observe=observe)
            self.metrics.decision_latency.observe(time.perf_counter() - t)
            self.metrics.pd_decisions.labels(decision.reason).inc()
            span.set_attribute("tandem.decode_worker_id", decode.worker_id)
            span.set_attribute("tandem.pd_decision", decision.reason)
            span.set_attribute("tandem.uncached_tokens", decision.num_uncached_tokens)
            if decision.prefill is not None:
                span.set_attribute("tandem.prefill_worker_id", decision.prefill.worker_id)
        return decode, decision
