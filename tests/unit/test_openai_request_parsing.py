"""OpenAI request bodies → GenerateRequests, and every bad field → a 400 naming it."""

from __future__ import annotations

import grpc
import pytest

from gateway.openai_api.errors import ApiError, from_request_error
from gateway.openai_api.request_parsing import COMPLETION_DEFAULT_MAX_TOKENS, parse_request
from gateway.request_validation import validate_request
from services.common.errors import RequestError

USER = [{"role": "user", "content": "hi"}]


def test_completion_fields_map_onto_the_sampling_params():
    body = {"model": "m", "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": -3,
            "stop": "\n", "stop_token_ids": [2], "ignore_eos": True, "logprobs": 2, "cache_salt": "s", "return_token_ids": True,
            "stream": True, "stream_options": {"include_usage": True}, "user": "ignored", "n": 1, "echo": False, "presence_penalty": 0}  # fmt: skip
    r = parse_request(body, "completion")
    (req,) = r.requests
    p = req.sampling
    assert (req.text, req.model, req.cache_salt) == ("Hello", "m", "s")
    assert (p.max_tokens, p.top_k, p.seed, list(p.stop), list(p.stop_token_ids), p.ignore_eos, p.logprobs) == (7, 5, 2**64 - 3, ["\n"], [2], True, 2)
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert (r.stream, r.include_usage, r.num_logprobs, r.return_token_ids) == (True, True, 2, True)


def test_completion_defaults_follow_openai():
    r = parse_request({"prompt": "x"}, "completion")
    p = r.requests[0].sampling
    assert p.max_tokens == COMPLETION_DEFAULT_MAX_TOKENS
    assert not p.HasField("temperature") and not p.HasField("logprobs") and not p.HasField("seed")
    assert (r.model, r.stream, r.include_usage, r.num_logprobs) == ("", False, False, None)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("one", [("text", "one")]),
        (["a", "b"], [("text", "a"), ("text", "b")]),
        ([5, 6, 7], [("token_ids", [5, 6, 7])]),
        ([[1, 2], [3]], [("token_ids", [1, 2]), ("token_ids", [3])]),
    ],
)
def test_every_prompt_form_gives_one_request_per_prompt(prompt, expected):
    requests = parse_request({"prompt": prompt}, "completion").requests
    got = [(r.WhichOneof("prompt"), r.text if r.WhichOneof("prompt") == "text" else list(r.token_ids.ids)) for r in requests]
    assert got == expected


def test_chat_messages_roles_parts_and_newer_names():
    body = {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 3, "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 4, "add_generation_prompt": False}  # fmt: skip
    r = parse_request(body, "chat")
    chat = r.requests[0].chat
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"), ("user", "a\nb")]
    assert chat.add_generation_prompt is False
    assert r.requests[0].sampling.max_tokens == 9 and r.requests[0].sampling.logprobs == 4 and r.num_logprobs == 4


def test_chat_leaves_max_tokens_to_the_gateway_and_logprobs_off():
    r = parse_request({"messages": USER}, "chat")
    assert not r.requests[0].sampling.HasField("max_tokens") and r.num_logprobs is None
    assert parse_request({"messages": USER, "logprobs": True}, "chat").num_logprobs == 0


BAD = [
    ("completion", {}, "prompt"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": []}, "prompt"),
    ("completion", {"prompt": ["a", 1]}, "prompt"),
    ("completion", {"prompt": [1, -2]}, "prompt"),
    ("completion", {"prompt": [[1], []]}, "prompt"),
    ("completion", {"prompt": ["a"] * 300}, "prompt"),
    ("completion", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completion", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ("completion", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("completion", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completion", {"prompt": "x", "top_k": -2}, "top_k"),
    ("completion", {"prompt": "x", "seed": True}, "seed"),
    ("completion", {"prompt": "x", "stop": 3}, "stop"),
    ("completion", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("completion", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completion", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("completion", {"prompt": "x", "n": 2}, "n"),
    ("completion", {"prompt": "x", "n": True}, "n"),
    ("completion", {"prompt": "x", "best_of": 3}, "best_of"),
    ("completion", {"prompt": "x", "echo": True}, "echo"),
    ("completion", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("completion", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("completion", {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ("completion", {"prompt": "x", "stream": "yes"}, "stream"),
    ("completion", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completion", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("completion", {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ("completion", {"prompt": "x", "model": 3}, "model"),
    ("chat", {}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": ["hi"]}, "messages[0]"),
    ("chat", {"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ("chat", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": USER, "logprobs": 2}, "logprobs"),
    ("chat", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ("chat", {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("completion", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completion", {"prompt": "x", "temperature": 1e300}, "temperature"),
    ("completion", {"prompt": "x", "temperature": 10**400}, "temperature"),
    ("completion", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("completion", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completion", {"prompt": "x", "top_p": "0.5"}, "top_p"),
    ("completion", {"prompt": "x", "seed": "7"}, "seed"),
    ("completion", {"prompt": "x", "max_tokens": 2**40}, "max_tokens"),
]


@pytest.mark.parametrize("kind, body, field", BAD, ids=[f"{k}-{f}-{i}" for i, (k, _, f) in enumerate(BAD)])
def test_bad_fields_are_400_naming_the_field(kind, body, field):
    with pytest.raises(ApiError) as err:
        parse_request(body, kind)
    assert err.value.status == 400
    assert err.value.param == field
    assert err.value.message.startswith(field.split("[")[0]) or field in err.value.message, err.value.message
    assert err.value.to_json()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_an_object_is_400():
    with pytest.raises(ApiError) as err:
        parse_request([1, 2], "completion")
    assert err.value.status == 400


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "stop": ["ok", ""]}, "stop[1]"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stop": ["s" * 257]}, "stop[0]"),
        ({"prompt": "x", "stop_token_ids": [1] * 257}, "stop_token_ids"),
        ({"prompt": "x", "cache_salt": "s" * 257}, "cache_salt"),
        ({"prompt": "x" * 1_000_001}, "prompt"),
        ({"messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 600_000}] * 2}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_range_errors_of_the_shared_validation_name_the_openai_field(body, param):
    kind = "chat" if "messages" in body else "completion"
    request = parse_request(body, kind).requests[0]
    with pytest.raises(RequestError) as err:
        validate_request(request, set())
    api = from_request_error(err.value)
    assert (api.status, api.param) == (400, param)
    assert api.message.startswith(param), api.message
    assert "sampling." not in api.message and "chat." not in api.message


@pytest.mark.parametrize(
    "code, status, error_type",
    [
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_grpc_codes_become_http_statuses(code, status, error_type):
    api = from_request_error(RequestError(code, "something"))
    assert (api.status, api.type, api.code) == (status, error_type, code.name.lower())


def test_a_prompt_over_the_context_is_context_length_exceeded():
    e = RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is 9000 tokens but the model's context (max_model_len) is 8192; shorten it")
    api = from_request_error(e)
    assert (api.status, api.param, api.code) == (400, "prompt", "context_length_exceeded")
