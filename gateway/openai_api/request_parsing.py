"""An OpenAI request body → the gateway's GenerateRequests (one per prompt), or a 400 naming the field.

Only the shape is checked here (types, which fields exist, what Tandem cannot do); the ranges of
the sampling fields are checked once for both front doors by gateway/request_validation.py, whose
messages errors.py translates. Fields are OpenAI's, plus the vLLM extensions Tandem can honour
(`top_k`, `stop_token_ids`, `ignore_eos`, `include_stop_str_in_output`, `skip_special_tokens`,
`cache_salt`, `return_token_ids`, `add_generation_prompt`). Unknown fields are ignored, as vLLM
does; known ones Tandem cannot honour are refused unless they hold their neutral value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from protos.tandem.v1 import common_pb2, gateway_pb2

from ..request_validation import MAX_TEMPERATURE
from .errors import invalid_field

MAX_PROMPTS = 256  # prompts in one /v1/completions request (each is its own generation)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
UINT32 = 2**32

# fields Tandem does not implement: refused unless they hold the value that changes nothing
_NEUTRAL = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "logit_bias": (None, {}),
    "prompt_logprobs": (None,),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}


@dataclass
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str  # as the client named it ("" = the served one)
    requests: list[gateway_pb2.GenerateRequest]  # one per prompt: choice i is requests[i]
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage
    num_logprobs: int | None  # top logprobs per token (completions' `logprobs`, chat's `top_logprobs`); None = off
    return_token_ids: bool  # vLLM's extension: token ids beside the text


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Body:
    """Typed reads of a JSON object's fields; each wrong type is a 400 naming the field."""

    def __init__(self, data: dict):
        self.data = data

    def get(self, name: str):
        return self.data.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid_field(name, f"{name} must be true or false, got {_show(value)}")
        return value

    def integer(self, name: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_field(name, f"{name} must be an integer, got {_show(value)}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else "") if b)
            raise invalid_field(name, f"{name} must be {bounds}, got {value}")
        return value

    def number(self, name: str, minimum: float, maximum: float, open_minimum: bool = False) -> float | None:
        """A finite number in [minimum, maximum] (or (minimum, maximum] when `open_minimum`)."""
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid_field(name, f"{name} must be a number, got {_show(value)}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**64 else math.inf  # a huge int has no float
        low_ok = number > minimum if open_minimum else number >= minimum
        if not (math.isfinite(number) and low_ok and number <= maximum):
            bounds = f"{'(' if open_minimum else '['}{minimum:g}, {maximum:g}]"
            raise invalid_field(name, f"{name} must be a number in {bounds}, got {_show(value)}")
        return number

    def string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, str):
            raise invalid_field(name, f"{name} must be a string, got {_show(value)}")
        return value


def _is_neutral(value, neutral: tuple) -> bool:
    for v in neutral:
        if v is None:
            if value is None:
                return True
        elif isinstance(value, bool) == isinstance(v, bool) and value == v:  # true is not 1 here
            return True
    return False


def _check_unsupported(body: _Body) -> None:
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if _is_neutral(value, neutral):
            continue
        raise invalid_field(name, f"{name} is not supported by Tandem (got {_show(value)}); leave it out or set it to {_show(neutral[-1])}")


def _sampling(body: _Body, kind: str) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams()
    max_tokens = body.integer("max_tokens", 1, UINT32 - 1)
    if kind == "chat":
        max_tokens = body.integer("max_completion_tokens", 1, UINT32 - 1) or max_tokens  # OpenAI's newer name wins
    elif max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        p.max_tokens = max_tokens
    temperature = body.number("temperature", 0.0, MAX_TEMPERATURE)
    if temperature is not None:
        p.temperature = temperature
    top_p = body.number("top_p", 0.0, 1.0, open_minimum=True)
    if top_p is not None:
        p.top_p = top_p
    top_k = body.integer("top_k", -1, 2**31 - 1)
    if top_k is not None:
        p.top_k = -1 if top_k == 0 else top_k  # vLLM: 0 and -1 both mean off
    seed = body.integer("seed")
    if seed is not None:
        p.seed = seed % 2**64  # OpenAI seeds are signed; the worker's generator takes 64 bits
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid_field("stop", f"stop must be a string or a list of strings, got {_show(stop)}")
        p.stop.extend(stop)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < UINT32 for t in stop_ids):
            raise invalid_field("stop_token_ids", f"stop_token_ids must be a list of token ids (integers >= 0), got {_show(stop_ids)}")
        p.stop_token_ids.extend(stop_ids)
    p.ignore_eos = body.boolean("ignore_eos", False)
    p.include_stop_str_in_output = body.boolean("include_stop_str_in_output", False)
    if body.get("skip_special_tokens") is not None:
        p.skip_special_tokens = body.boolean("skip_special_tokens", True)
    return p


def _stream_options(body: _Body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid_field("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise invalid_field("stream_options", f"stream_options must be an object, got {_show(options)}")
    for name in ("include_usage", "continuous_usage_stats"):
        if options.get(name) is not None and not isinstance(options[name], bool):
            raise invalid_field(f"stream_options.{name}", f"stream_options.{name} must be true or false, got {_show(options[name])}")
    if options.get("continuous_usage_stats"):
        raise invalid_field("stream_options.continuous_usage_stats", "stream_options.continuous_usage_stats is not supported (usage comes at the end)")
    return bool(options.get("include_usage"))


def _prompts(value) -> list[tuple[str, object]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of lists of them."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid_field("prompt", f"prompt must be a string, a list of strings, a list of token ids or a list of such lists, got {_show(value)}")

    def token_ids(ids, where: str) -> list[int]:
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < UINT32:
                raise invalid_field("prompt", f"{where}[{i}] must be a token id (an integer >= 0), got {_show(t)}")
        return ids

    if all(isinstance(x, str) for x in value):
        prompts = [("text", x) for x in value]
    elif all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        prompts = [("token_ids", token_ids(value, "prompt"))]
    elif all(isinstance(x, list) for x in value):
        for i, x in enumerate(value):
            if not x:
                raise invalid_field("prompt", f"prompt[{i}] must not be empty")
        prompts = [("token_ids", token_ids(x, f"prompt[{i}]")) for i, x in enumerate(value)]
    else:
        raise invalid_field("prompt", "prompt must not mix strings, token ids and lists")
    if len(prompts) > MAX_PROMPTS:
        raise invalid_field("prompt", f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    for i, (kind, x) in enumerate(prompts):
        if kind == "text" and not x:
            raise invalid_field("prompt", "prompt must not be empty" if len(prompts) == 1 else f"prompt[{i}] must not be empty")
    return prompts


def _content(content, i: int) -> str:
    """A message's content: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise invalid_field(f"messages[{i}].content[{j}]", f"messages[{i}].content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}"
                                    + (f"; {kind!r} parts are not supported" if kind and kind != "text" else ""))  # fmt: skip
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid_field(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts, got {_show(content)}")


def _chat(body: _Body) -> common_pb2.ChatMessages:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_field("messages", f'messages must be a non-empty list of {{"role", "content"}} objects, got {_show(messages)}')
    chat = common_pb2.ChatMessages(add_generation_prompt=body.boolean("add_generation_prompt", True))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid_field(f"messages[{i}]", f"messages[{i}] must be an object with role and content, got {_show(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid_field(f"messages[{i}].role", f"messages[{i}].role must be a string, got {_show(role)}")
        if m.get("tool_calls"):
            raise invalid_field(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls: tool calling is not supported by Tandem")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        chat.messages.append(common_pb2.ChatMessage(role=role, content=_content(m.get("content"), i)))
    return chat


def parse_request(data, kind: str) -> OpenAIRequest:
    """The body of POST /v1/completions (kind "completion") or /v1/chat/completions ("chat").
    Raises ApiError (400) naming the field. Does not mutate `data`."""
    if not isinstance(data, dict):
        raise invalid_field(None, "the request body must be a JSON object")
    body = _Body(data)
    _check_unsupported(body)
    model = body.string("model") or ""
    stream = body.boolean("stream", False)
    include_usage = _stream_options(body, stream)
    sampling = _sampling(body, kind)
    if kind == "completion":
        num_logprobs = body.integer("logprobs", 0, 20)
    else:
        wants = body.boolean("logprobs", False)
        top = body.integer("top_logprobs", 0, 20)
        if top is not None and not wants:
            raise invalid_field("top_logprobs", "top_logprobs needs logprobs set to true")
        num_logprobs = (top or 0) if wants else None
    if num_logprobs is not None:
        sampling.logprobs = num_logprobs
    salt = body.string("cache_salt") or ""
    base = gateway_pb2.GenerateRequest(model=model, sampling=sampling, cache_salt=salt)
    requests = []
    if kind == "completion":
        if "prompt" not in data:
            raise invalid_field("prompt", "prompt is required")
        for which, prompt in _prompts(data["prompt"]):
            req = gateway_pb2.GenerateRequest()
            req.CopyFrom(base)
            if which == "text":
                req.text = prompt
            else:
                req.token_ids.ids.extend(prompt)
            requests.append(req)
    else:
        base.chat.CopyFrom(_chat(body))
        requests.append(base)
    return OpenAIRequest(kind, model, requests, stream, include_usage, num_logprobs, body.boolean("return_token_ids", False))
