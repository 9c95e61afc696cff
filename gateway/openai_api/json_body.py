"""An HTTP request body → a JSON value that every later step can handle, or a 400 naming the problem.

Python's json module accepts more than JSON and more than the request path can take:
    NaN, Infinity, -Infinity     literals outside JSON; refused
    1e400                        parses to inf; refused (a number must be finite)
    10**5000                     ValueError from the int conversion limit; refused
    [[[[...]]]] 100,000 deep     RecursionError in the decoder; refused, and any nesting deeper
                                 than MAX_DEPTH is refused before anything walks it recursively
    "\\ud800"                     a lone surrogate: a str that cannot be encoded as UTF-8, which
                                 protobuf (and the tokenizer) raise on later; refused, naming
                                 the field
    bytes that are not UTF-8     refused
"""

from __future__ import annotations

import json
import math

from .errors import ApiError, invalid_field

MAX_DEPTH = 32  # OpenAI bodies nest 5 deep at most (messages[i].content[j].text)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON value; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large; numbers must be finite")
    return value


def parse_json_body(body: bytes):
    """The JSON value of `body`; raises ApiError(400) for anything in the module's list."""
    try:
        value = json.loads(body, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise invalid_field(None, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise invalid_field(None, "the request body is not valid UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise invalid_field(None, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # our hooks, and integers beyond Python's digit limit
        raise invalid_field(None, f"the request body is not valid JSON: {str(e)[:200]}") from None
    check_json_value(value)
    return value


def _path(parent: str, key) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _check_string(s: str, where: str, is_key: bool = False) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        name = f"a key in {where}" if is_key and where else "a key" if is_key else where
        param = None if is_key else where.split(".")[0].split("[")[0]
        raise invalid_field(param, f"{name} is not valid Unicode (a lone surrogate escape such as \\ud800); send UTF-8 text") from None


def check_json_value(value) -> None:
    """Raise ApiError(400) when `value` nests deeper than MAX_DEPTH or holds a string (or key) that
    is not valid Unicode. Iterative, so a deep value cannot exhaust the stack here."""
    stack = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item, where)
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise invalid_field(None, f"the request body nests deeper than {MAX_DEPTH} levels (at {where or 'the top'})")
            if isinstance(item, dict):
                for k, v in item.items():
                    _check_string(k, where, is_key=True)
                    stack.append((v, _path(where, k), depth + 1))
            else:
                stack.extend((v, _path(where, i), depth + 1) for i, v in enumerate(item))


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (the gateway's http_max_body_bytes)", code="request_too_large")
