"""Protobuf ⇄ engine types, for the worker services (the engine never sees protobuf)."""

from __future__ import annotations

from protos.tandem.v1 import common_pb2
from services.common.errors import invalid
from services.engine.sampling_params import SamplingParams

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_proto(p: common_pb2.SamplingParams, max_tokens_default: int) -> SamplingParams:
    """Raises ValueError naming the field (SamplingParams validates every range)."""
    return SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else max_tokens_default,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else -1,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
    )


def response_from_output(out, num_logprobs_sent: int) -> common_pb2.GenerateResponse:
    """One engine RequestOutput → one stream chunk; usage only on the final chunk. Raises
    RequestError(INVALID_ARGUMENT) for an output that failed its request (finish_reason "error"),
    so that request's stream alone ends with that status."""
    if out.error is not None:
        raise invalid(f"request {out.request_id} failed: {out.error}")
    resp = common_pb2.GenerateResponse(
        request_id=out.request_id,
        token_ids=out.new_token_ids,
        text=out.delta_text,
        finish_reason=FINISH_REASONS[out.finish_reason],
    )
    if isinstance(out.stop_reason, str):
        resp.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        resp.stop_token_id = out.stop_reason
    for lp in out.logprobs[num_logprobs_sent:]:
        resp.logprobs.append(
            common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        )
    if out.finished:
        resp.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=len(out.prompt_token_ids),
                completion_tokens=len(out.token_ids),
                cached_prompt_tokens=out.num_cached_tokens,
            )
        )
    return resp
