"""The P/D decider: prefill this request on a prefill worker first, or let the decode worker do it?

The decode worker is chosen first (by the routing policy). Disaggregation pays when the prompt
tokens that worker would have to compute (those it does not hold in its prefix cache) are many:
computing them there would stall its running streams for a whole step, while a prefill worker
computes them in parallel and the decode worker pulls only the blocks it lacks. A decode worker
that already holds most of the prompt is cheaper to serve aggregated, however long the prompt.
A prefill worker is used only while its backlog is below its queue limit, so a burst of long
prompts does not queue behind one prefill worker while decode workers sit idle. A request may
force either mode (tests, benchmarks).

    mode AGGREGATED                                   → aggregated
    mode DISAGGREGATED                                → the best prefill worker, or UNAVAILABLE
    AUTO, threshold 0 / uncached < threshold          → aggregated
    AUTO, uncached ≥ threshold, a prefill worker below its limit → disaggregated there
    AUTO, uncached ≥ threshold, every prefill worker at its limit (or none) → aggregated
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protos.tandem.v1 import gateway_pb2
from services.common.errors import unavailable

from .prefix_index import PrefixIndex
from .scheduling.base import RequestContext
from .scheduling.router import Router


@dataclass(frozen=True)
class PDDecision:
    prefill: object | None  # the prefill worker's handle; None = serve aggregated
    num_uncached_tokens: int  # prompt tokens the chosen decode worker does not hold
    reason: str  # forced-aggregated | forced-disaggregated | below-threshold | prefill-unavailable | disaggregated

    @property
    def disaggregate(self) -> bool:
        return self.prefill is not None


def uncached_tokens(ctx: RequestContext, index: PrefixIndex, decode_handle) -> int:
    """Prompt tokens `decode_handle` would compute: all but its leading run of held blocks."""
    if decode_handle is None or not ctx.block_hashes:
        return ctx.num_prompt_tokens
    held_blocks = index.match(ctx.block_hashes, [decode_handle.worker_id]).get(decode_handle.worker_id, 0)
    return ctx.num_prompt_tokens - held_blocks * ctx.block_size


def decide(mode: int, ctx: RequestContext, decode_handle, prefill_candidates: Iterable, router: Router, observe=None) -> PDDecision:
    """Where to prefill. Raises RequestError(UNAVAILABLE) when disaggregation is forced and no
    prefill worker can take it. Mutates nothing but the router's session table."""
    uncached = uncached_tokens(ctx, router.index, decode_handle)
    if mode == gateway_pb2.SERVING_MODE_AGGREGATED:
        return PDDecision(None, uncached, "forced-aggregated")
    if mode == gateway_pb2.SERVING_MODE_DISAGGREGATED:
        prefill = router.pick_prefill(ctx, prefill_candidates, respect_limit=False, observe=observe)
        if prefill is None:
            raise unavailable("mode is DISAGGREGATED but no prefill worker is ready; start one with `tandem serve prefill` or use AUTO")
        return PDDecision(prefill, uncached, "forced-disaggregated")
    threshold = router.config.disaggregation.min_uncached_tokens
    if not threshold or uncached < threshold:
        return PDDecision(None, uncached, "below-threshold")
    prefill = router.pick_prefill(ctx, prefill_candidates, observe=observe)
    if prefill is None:
        return PDDecision(None, uncached, "prefill-unavailable")
    return PDDecision(prefill, uncached, "disaggregated")
