"""Checks on a Gateway.Generate request, before any hop: each failure names the field to fix.

Sizes are checked before anything walks a field (the chat's message count before its roles, the
text's length before it is tokenized), so an oversized request costs no more than reading it.
The limits are the gateway's settings (services/common/config.py, RequestLimits below); the
ranges of the sampling values are where their math is defined, the same the workers check.
"""

from __future__ import annotations

import dataclasses
import math

from protos.tandem.v1 import common_pb2, gateway_pb2
from services.common.chat import chat_messages_to_dicts, check_chat_size
from services.common.config import ServiceConfig
from services.common.errors import invalid

MAX_REQUEST_ID_LEN = 256
MAX_MODEL_NAME_LEN = 256
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0  # as the workers' SamplingParams (services/engine/sampling_params.py)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The gateway's size limits on a request (each a setting of the same name)."""

    max_prompt_chars: int
    max_chat_messages: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_cache_salt_chars: int

    @classmethod
    def from_config(cls, config: ServiceConfig) -> "RequestLimits":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def defaults(cls) -> "RequestLimits":
        settings = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}
        return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls)})


DEFAULT_LIMITS = RequestLimits.defaults()


def validate_request(req: gateway_pb2.GenerateRequest, served_models: set[str], limits: RequestLimits = DEFAULT_LIMITS) -> None:
    """Raise RequestError(INVALID_ARGUMENT) for a request no worker could serve. Does not mutate."""
    try:
        _validate(req, served_models, limits)
    except ValueError as e:
        raise invalid(str(e)) from None


def _show(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _validate(req: gateway_pb2.GenerateRequest, served_models: set[str], limits: RequestLimits) -> None:
    if len(req.request_id) > MAX_REQUEST_ID_LEN or not req.request_id.isprintable():
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_LEN} printable characters")
    if len(req.model) > MAX_MODEL_NAME_LEN:
        raise ValueError(f"model must be at most {MAX_MODEL_NAME_LEN} characters, got {len(req.model)}")
    if req.model and served_models and req.model not in served_models:
        raise ValueError(f"model {_show(req.model)} is not served by this cluster; served: {', '.join(sorted(served_models))} (or leave model empty)")
    which = req.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt is missing: set one of text, chat or token_ids")
    if which == "text" and not req.text:
        raise ValueError("text must not be empty")
    if which == "text" and len(req.text) > limits.max_prompt_chars:
        raise ValueError(f"text must be at most {limits.max_prompt_chars} characters (max_prompt_chars), got {len(req.text)}")
    if which == "token_ids" and not req.token_ids.ids:
        raise ValueError("token_ids.ids must not be empty")
    if which == "chat":
        check_chat_size(req.chat, limits.max_chat_messages, limits.max_prompt_chars)
        chat_messages_to_dicts(req.chat)
    if req.mode not in gateway_pb2.ServingMode.values():
        raise ValueError(f"mode must be one of {', '.join(gateway_pb2.ServingMode.keys())}, got {req.mode}")
    if len(req.cache_salt) > limits.max_cache_salt_chars:
        raise ValueError(f"cache_salt must be at most {limits.max_cache_salt_chars} characters (max_cache_salt_chars), got {len(req.cache_salt)}")
    validate_sampling(req.sampling, limits)


def validate_sampling(p: common_pb2.SamplingParams, limits: RequestLimits = DEFAULT_LIMITS) -> None:
    if p.HasField("max_tokens") and p.max_tokens < 1:
        raise ValueError(f"sampling.max_tokens must be >= 1, got {p.max_tokens}")
    if p.HasField("temperature") and not (math.isfinite(p.temperature) and 0 <= p.temperature <= MAX_TEMPERATURE):
        raise ValueError(f"sampling.temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {p.temperature}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {p.top_p}")
    if p.HasField("top_k") and not (p.top_k == -1 or p.top_k >= 1):
        raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {p.top_k}")
    if p.HasField("logprobs") and p.logprobs > MAX_LOGPROBS:
        raise ValueError(f"sampling.logprobs must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
    if len(p.stop) > limits.max_stop_strings:
        raise ValueError(f"sampling.stop must hold at most {limits.max_stop_strings} strings (max_stop_strings), got {len(p.stop)}")
    for i, s in enumerate(p.stop):
        if not s:
            raise ValueError(f"sampling.stop[{i}] must not be empty")
        if len(s) > limits.max_stop_string_chars:
            raise ValueError(f"sampling.stop[{i}] must be at most {limits.max_stop_string_chars} characters (max_stop_string_chars), got {len(s)}")
    if len(p.stop_token_ids) > limits.max_stop_token_ids:
        raise ValueError(f"sampling.stop_token_ids must hold at most {limits.max_stop_token_ids} ids (max_stop_token_ids), got {len(p.stop_token_ids)}")


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
