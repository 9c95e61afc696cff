"""The P/D decider: prefill this request on a prefill worker first, or let the decode worker do it?

Disaggregation pays when the prompt is long (its prefill would stall the decode worker's running
streams for a whole step) and costs a KV transfer and a hop otherwise. For now the rule is a
prompt-length threshold; the KV-aware picker will count only the tokens the chosen decode worker
does not already hold. A request may force either mode (tests, benchmarks).
"""

from __future__ import annotations

from protos.tandem.v1 import gateway_pb2
from services.common.errors import unavailable


def should_disaggregate(mode: int, num_prompt_tokens: int, min_prompt_tokens: int, num_prefill_ready: int) -> bool:
    """Raises RequestError(UNAVAILABLE) when disaggregation is forced and no prefill worker is ready."""
    if mode == gateway_pb2.SERVING_MODE_AGGREGATED:
        return False
    if mode == gateway_pb2.SERVING_MODE_DISAGGREGATED:
        if not num_prefill_ready:
            raise unavailable("mode is DISAGGREGATED but no prefill worker is ready; start one with `tandem serve prefill` or use AUTO")
        return True
    return bool(min_prompt_tokens) and num_prompt_tokens >= min_prompt_tokens and num_prefill_ready > 0
