"""Request bodies Python's json accepts but the request path cannot take are 400s naming the problem."""

from __future__ import annotations

import json

import pytest

from gateway.openai_api.errors import ApiError
from gateway.openai_api.json_body import MAX_DEPTH, parse_json_body
from gateway.openai_api.request_parsing import parse_request


@pytest.mark.parametrize(
    "body, says, param",
    [
        (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON value", None),
        (b'{"prompt": "x", "temperature": Infinity}', "Infinity is not a JSON value", None),
        (b'{"prompt": "x", "top_p": -Infinity}', "-Infinity is not a JSON value", None),
        (b'{"prompt": "x", "temperature": 1e400}', "too large", None),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "not valid JSON", None),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper", None),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "nests deeper", None),
        (b'{"prompt": "\\ud800"}', "prompt is not valid Unicode", "prompt"),
        (b'{"messages": [{"role": "user", "content": "ok \\udfff"}]}', "messages[0].content is not valid Unicode", "messages"),
        (b'{"\\ud83d": 1}', "not valid Unicode", None),
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8", None),
        (b"\xff\xfe\x00garbage", "not valid", None),
        (b"", "not valid JSON", None),
        (b'{"prompt": "x"', "not valid JSON", None),
    ],
)
def test_bad_bodies_are_400(body, says, param):
    with pytest.raises(ApiError) as err:
        parse_json_body(body)
    assert err.value.status == 400 and says in err.value.message, err.value.message
    assert err.value.param == param
    json.dumps(err.value.to_json())  # the error itself is serialisable (no surrogates in it)


def test_good_bodies_pass_unchanged():
    body = {"prompt": "Grüße 🚀 \u2028", "temperature": 0.5, "seed": 2**63, "stop": ["\n"], "messages": [{"content": [{"type": "text", "text": "x"}]}]}
    assert parse_json_body(json.dumps(body).encode()) == body
    assert parse_json_body(json.dumps(body, ensure_ascii=False).encode()) == body
    assert parse_json_body(b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1))


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "temperature": 10**300},
        {"prompt": "x", "top_p": [1]},
        {"prompt": "x", "max_tokens": -(10**300)},
        {"prompt": "x", "n": 10**300},
        {"prompt": [[1, 2], "x"]},
        {"prompt": [[10**40]]},
        {"prompt": "x", "stop": [1]},
        {"prompt": "x", "stream_options": {"include_usage": True}},
        {"prompt": "x", "logit_bias": {"1": 100}},
        {"prompt": {"nested": {"deep": [1]}}},
    ],
)
def test_wrong_types_and_huge_numbers_are_400_not_500(body):
    with pytest.raises(ApiError) as err:
        parse_request(parse_json_body(json.dumps(body).encode()), "completion")
    assert err.value.status == 400
