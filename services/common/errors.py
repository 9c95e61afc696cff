"""How request errors become gRPC statuses, once for every service."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """An error with its gRPC status code; the message says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)
