"""Errors as the OpenAI API shapes them: `{"error": {"message", "type", "param", "code"}}` with an
HTTP status, and the mapping from the gateway's gRPC status codes to those.

The request path (gateway/request_path.py, request_validation) names proto fields in its messages
(`sampling.max_tokens`, `chat.messages[0].role`); an HTTP client knows them by their OpenAI names
(`max_tokens`, `messages[0].role`), so messages are rewritten with the table below and `param`
says which field to fix.
"""

from __future__ import annotations

import re

import grpc

from services.common.errors import RequestError

# gRPC status → HTTP status. CANCELLED reaches a client only when a worker was stopping.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_error"}

# proto field paths in the request path's messages → the OpenAI request's field names
_PROTO_NAMES = [
    ("sampling.", ""),
    ("chat.messages", "messages"),
    ("token_ids.ids", "prompt"),
    ("prompt_token_ids", "prompt"),
]
_PARAM = re.compile(r"^([a-z_]+(?:\[\d+\])*(?:\.[a-z_]+(?:\[\d+\])*)*) (?:must|is|=)")
_KNOWN_PARAMS = {
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "logprobs",
    "text",
    "model",
    "cache_salt",
}


class ApiError(Exception):
    """An error response: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = error_type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_field(param: str, message: str) -> ApiError:
    """400 for a bad field; the message starts with the field's name."""
    return ApiError(400, message, param=param)


def from_request_error(e: RequestError) -> ApiError:
    """The HTTP form of an error the request path raised."""
    status = HTTP_STATUS.get(e.code, 500)
    message = str(e)
    for proto, http in _PROTO_NAMES:
        message = message.replace(proto, http)
    if message.startswith("text must "):
        message = "prompt" + message.removeprefix("text")
    param, code = None, None
    if status == 400:
        match = _PARAM.match(message)
        if match and re.sub(r"\[\d+\]", "", match.group(1)).split(".")[0] in _KNOWN_PARAMS:
            param = match.group(1)
        if message.startswith("prompt is ") and "tokens but" in message:
            param, code = "prompt", "context_length_exceeded"  # OpenAI's code for a prompt over the context
    else:
        code = e.code.name.lower()
    return ApiError(status, message, param=param, code=code)
