"""Gateway request checks: every rejection is INVALID_ARGUMENT and names the field to fix."""

from __future__ import annotations

import math

import grpc
import pytest

from gateway.request_validation import MAX_LOGPROBS, MAX_REQUEST_ID_LEN, RequestLimits, check_prompt_length, validate_request
from protos.tandem.v1 import common_pb2, gateway_pb2
from services.common.errors import RequestError

SERVED = {"smollm2"}


def chat(*pairs, add_generation_prompt=None):
    msgs = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in pairs])
    if add_generation_prompt is not None:
        msgs.add_generation_prompt = add_generation_prompt
    return msgs


def req(**kw):
    if not any(k in kw for k in ("text", "chat", "token_ids", "no_prompt")):
        kw["text"] = "hello"
    kw.pop("no_prompt", None)
    sampling = kw.pop("sampling", None)
    r = gateway_pb2.GenerateRequest(**kw)
    if sampling is not None:
        r.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return r


def token_ids(*ids):
    return common_pb2.TokenIds(ids=list(ids))


# ---- valid -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_kw, served",
    [
        ({"text": "hello"}, SERVED),
        ({"text": " "}, SERVED),
        ({"token_ids": token_ids(1, 2, 3)}, SERVED),
        ({"token_ids": token_ids(0)}, SERVED),
        ({"chat": chat(("user", "hi"))}, SERVED),
        ({"chat": chat(("system", "s"), ("user", "u"), ("assistant", "a"), ("tool", "t"), ("user", ""))}, SERVED),
        ({"chat": chat(("user", "hi"), add_generation_prompt=False)}, SERVED),
        ({"model": "smollm2"}, SERVED),
        ({"model": ""}, SERVED),
        ({"model": "anything"}, set()),  # nothing known about the served models yet: allow
        ({"request_id": "r" * MAX_REQUEST_ID_LEN}, SERVED),
        ({"request_id": ""}, SERVED),
        ({"request_id": "req-ü-1 2"}, SERVED),
        ({"sampling": {}}, SERVED),
        ({"sampling": {"temperature": 0.0}}, SERVED),
        ({"sampling": {"temperature": 2.5, "top_p": 1.0, "top_k": -1}}, SERVED),
        ({"sampling": {"top_p": 0.01, "top_k": 1}}, SERVED),
        ({"sampling": {"top_k": 50, "max_tokens": 1}}, SERVED),
        ({"sampling": {"logprobs": 0}}, SERVED),
        ({"sampling": {"logprobs": MAX_LOGPROBS}}, SERVED),
        ({"sampling": {"stop": ["\n", "END"], "stop_token_ids": [2]}}, SERVED),
        ({"sampling": {"seed": 0, "ignore_eos": True}}, SERVED),
    ],
)
def test_valid_requests_pass(request_kw, served):
    r = req(**request_kw)
    before = r.SerializeToString()
    assert validate_request(r, served) is None
    assert r.SerializeToString() == before, "validate_request must not mutate"


# ---- invalid -------------------------------------------------------------------------------------


def empty_token_ids():
    r = gateway_pb2.GenerateRequest()
    r.token_ids.SetInParent()
    return r


def empty_chat():
    r = gateway_pb2.GenerateRequest()
    r.chat.SetInParent()
    return r


@pytest.mark.parametrize(
    "make, served, field, exact",
    [
        (lambda: req(no_prompt=True), SERVED, "prompt", "prompt is missing: set one of text, chat or token_ids"),
        (lambda: req(text=""), SERVED, "text", "text must not be empty"),
        (empty_token_ids, SERVED, "token_ids.ids", "token_ids.ids must not be empty"),
        (lambda: req(token_ids=token_ids()), SERVED, "token_ids.ids", "token_ids.ids must not be empty"),
        (empty_chat, SERVED, "chat.messages", "chat.messages must not be empty"),
        (
            lambda: req(chat=chat(("robot", "beep"))),
            SERVED,
            "chat.messages[0].role",
            "chat.messages[0].role must be one of system, user, assistant, tool, got 'robot'",
        ),
        (lambda: req(chat=chat(("user", "hi"), ("User", "x"))), SERVED, "chat.messages[1].role", None),
        (lambda: req(chat=chat(("", "hi"))), SERVED, "chat.messages[0].role", None),
        (
            lambda: req(sampling={"temperature": -1.0}),
            SERVED,
            "sampling.temperature",
            "sampling.temperature must be a finite number in [0, 100] (0 = greedy), got -1.0",
        ),
        (lambda: req(sampling={"temperature": math.nan}), SERVED, "sampling.temperature", None),
        (lambda: req(sampling={"temperature": math.inf}), SERVED, "sampling.temperature", None),
        (lambda: req(sampling={"top_p": 0.0}), SERVED, "sampling.top_p", "sampling.top_p must be in (0, 1], got 0.0"),
        (lambda: req(sampling={"top_p": 1.5}), SERVED, "sampling.top_p", "sampling.top_p must be in (0, 1], got 1.5"),
        (lambda: req(sampling={"top_p": -0.5}), SERVED, "sampling.top_p", None),
        (lambda: req(sampling={"top_p": math.nan}), SERVED, "sampling.top_p", None),
        (lambda: req(sampling={"top_k": 0}), SERVED, "sampling.top_k", "sampling.top_k must be -1 (off) or >= 1, got 0"),
        (lambda: req(sampling={"top_k": -2}), SERVED, "sampling.top_k", "sampling.top_k must be -1 (off) or >= 1, got -2"),
        (lambda: req(sampling={"max_tokens": 0}), SERVED, "sampling.max_tokens", "sampling.max_tokens must be >= 1, got 0"),
        (lambda: req(sampling={"logprobs": 21}), SERVED, "sampling.logprobs", "sampling.logprobs must be in [0, 20], got 21"),
        (lambda: req(sampling={"stop": [""]}), SERVED, "sampling.stop[0]", "sampling.stop[0] must not be empty"),
        (lambda: req(sampling={"stop": ["a", ""]}), SERVED, "sampling.stop[1]", "sampling.stop[1] must not be empty"),
        (
            lambda: req(model="gpt-9"),
            {"smollm2", "qwen"},
            "model",
            "model 'gpt-9' is not served by this cluster; served: qwen, smollm2 (or leave model empty)",
        ),
        (
            lambda: req(request_id="r" * (MAX_REQUEST_ID_LEN + 1)),
            SERVED,
            "request_id",
            "request_id must be at most 256 printable characters",
        ),
        (lambda: req(request_id="abc\n"), SERVED, "request_id", None),
        (lambda: req(request_id="a\x00b"), SERVED, "request_id", None),
        # the prompt is checked before sampling
        (lambda: req(text="", sampling={"top_k": 0}), SERVED, "text", "text must not be empty"),
    ],
)
def test_invalid_requests_name_the_field(make, served, field, exact):
    with pytest.raises(RequestError) as exc:
        validate_request(make(), served)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = str(exc.value)
    assert field in message
    if exact is not None:
        assert message == exact


# ---- check_prompt_length ------------------------------------------------------------------------------


def sampling(**kw):
    return common_pb2.SamplingParams(**kw)


@pytest.mark.parametrize(
    "num_prompt, params, max_model_len, default_max_tokens, expected",
    [
        (10, {}, 100, 256, 90),  # default capped to the room
        (10, {}, 100, 50, 50),  # default fits
        (10, {}, 100, 90, 90),
        (99, {}, 100, 256, 1),
        (0, {}, 100, 256, 100),
        (10, {"max_tokens": 5}, 100, 256, 5),
        (10, {"max_tokens": 90}, 100, 256, 90),  # exactly the room
        (10, {"max_tokens": 500}, 2048, 16, 500),  # explicit wins over the default
    ],
)
def test_check_prompt_length_returns_max_tokens(num_prompt, params, max_model_len, default_max_tokens, expected):
    assert check_prompt_length(num_prompt, sampling(**params), max_model_len, default_max_tokens) == expected


@pytest.mark.parametrize("num_prompt", [100, 101, 5000])
def test_check_prompt_length_prompt_too_long(num_prompt):
    with pytest.raises(RequestError) as exc:
        check_prompt_length(num_prompt, sampling(), 100, 256)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(exc.value) == (f"prompt is {num_prompt} tokens but the model's context (max_model_len) is 100; shorten the prompt to at most 99 tokens")


def test_check_prompt_length_max_tokens_exceeds_room():
    with pytest.raises(RequestError) as exc:
        check_prompt_length(30, sampling(max_tokens=71), 100, 256)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(exc.value) == (
        "sampling.max_tokens is 71 but the prompt (30 tokens) leaves room for 70 in the model's context of 100; lower max_tokens or shorten the prompt"
    )


# ---- size limits (RequestLimits: the gateway's settings) -----------------------------------------------

SMALL = RequestLimits(max_prompt_chars=100, max_chat_messages=3, max_stop_strings=2, max_stop_string_chars=5, max_stop_token_ids=2, max_cache_salt_chars=8)


@pytest.mark.parametrize(
    "make, exact",
    [
        (lambda: req(text="x" * 101), "text must be at most 100 characters (max_prompt_chars), got 101"),
        (lambda: req(chat=chat(*[("user", "hi")] * 4)), "chat.messages must hold at most 3 messages (max_chat_messages), got 4"),
        (
            lambda: req(chat=chat(("user", "x" * 60), ("assistant", "y" * 60))),
            "chat.messages must hold at most 100 characters in all (max_prompt_chars), got more",
        ),
        (lambda: req(sampling={"stop": ["a", "b", "c"]}), "sampling.stop must hold at most 2 strings (max_stop_strings), got 3"),
        (lambda: req(sampling={"stop": ["toolong"]}), "sampling.stop[0] must be at most 5 characters (max_stop_string_chars), got 7"),
        (lambda: req(sampling={"stop_token_ids": [1, 2, 3]}), "sampling.stop_token_ids must hold at most 2 ids (max_stop_token_ids), got 3"),
        (lambda: req(cache_salt="s" * 9), "cache_salt must be at most 8 characters (max_cache_salt_chars), got 9"),
        (lambda: req(model="m" * 300), "model must be at most 256 characters, got 300"),
        (lambda: req(sampling={"temperature": 101.0}), "sampling.temperature must be a finite number in [0, 100] (0 = greedy), got 101.0"),
    ],
)
def test_size_limits_name_the_field_and_the_setting(make, exact):
    with pytest.raises(RequestError) as exc:
        validate_request(make(), SERVED, SMALL)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(exc.value) == exact


def test_a_huge_chat_is_refused_by_its_count_before_its_roles_are_read():
    r = req(chat=chat(*[("robot", "x")] * 100_000))
    with pytest.raises(RequestError, match="at most 1024 messages"):
        validate_request(r, SERVED)


def test_the_default_limits_are_the_settings_defaults():
    from services.common.config import ServiceConfig

    assert RequestLimits.defaults() == RequestLimits.from_config(ServiceConfig(role="gateway"))
    assert RequestLimits.defaults().max_stop_strings == 16 and ServiceConfig(role="gateway").max_requests_in_flight == 256
