"""Checks on a Gateway.Generate request, before any hop: each failure names the field to fix."""

from __future__ import annotations

import math

from protos.tandem.v1 import common_pb2, gateway_pb2
from services.common.chat import chat_messages_to_dicts
from services.common.errors import invalid

MAX_REQUEST_ID_LEN = 256
MAX_LOGPROBS = 20


def validate_request(req: gateway_pb2.GenerateRequest, served_models: set[str]) -> None:
    """Raise RequestError(INVALID_ARGUMENT) for a request no worker could serve. Does not mutate."""
    try:
        _validate(req, served_models)
    except ValueError as e:
        raise invalid(str(e)) from None


def _validate(req: gateway_pb2.GenerateRequest, served_models: set[str]) -> None:
    if len(req.request_id) > MAX_REQUEST_ID_LEN or not req.request_id.isprintable():
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_LEN} printable characters")
    if req.model and served_models and req.model not in served_models:
        raise ValueError(f"model {req.model!r} is not served by this cluster; served: {', '.join(sorted(served_models))} (or leave model empty)")
    which = req.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt is missing: set one of text, chat or token_ids")
    if which == "text" and not req.text:
        raise ValueError("text must not be empty")
    if which == "token_ids" and not req.token_ids.ids:
        raise ValueError("token_ids.ids must not be empty")
    if which == "chat":
        chat_messages_to_dicts(req.chat)
    if req.mode not in gateway_pb2.ServingMode.values():
        raise ValueError(f"mode must be one of {', '.join(gateway_pb2.ServingMode.keys())}, got {req.mode}")
    validate_sampling(req.sampling)


def validate_sampling(p: common_pb2.SamplingParams) -> None:
    if p.HasField("max_tokens") and p.max_tokens < 1:
        raise ValueError(f"sampling.max_tokens must be >= 1, got {p.max_tokens}")
    if p.HasField("temperature") and not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise ValueError(f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {p.temperature}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {p.top_p}")
    if p.HasField("top_k") and not (p.top_k == -1 or p.top_k >= 1):
        raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {p.top_k}")
    if p.HasField("logprobs") and p.logprobs > MAX_LOGPROBS:
        raise ValueError(f"sampling.logprobs must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
    for i, s in enumerate(p.stop):
        if not s:
            raise ValueError(f"sampling.stop[{i}] must not be empty")


def check_prompt_length(num_prompt: int, sampling: common_pb2.SamplingParams, max_model_len: int, default_max_tokens: int) -> int:
    """The max_tokens to run with; raises RequestError when the prompt (plus max_tokens) does not fit."""
    if num_prompt >= max_model_len:
        raise invalid(
            f"prompt is {num_prompt} tokens but the model's context (max_model_len) is {max_model_len}; "
            f"shorten the prompt to at most {max_model_len - 1} tokens"
        )
    room = max_model_len - num_prompt
    if sampling.HasField("max_tokens"):
        if sampling.max_tokens > room:
            raise invalid(
                f"sampling.max_tokens is {sampling.max_tokens} but the prompt ({num_prompt} tokens) leaves room for "
                f"{room} in the model's context of {max_model_len}; lower max_tokens or shorten the prompt"
            )
        return sampling.max_tokens
    return min(default_max_tokens, room)
