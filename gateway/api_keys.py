"""API keys for the gateway's public API: one set, checked by both front doors.

Clients present a key as `Authorization: Bearer KEY` (an HTTP header on the OpenAI API, gRPC
metadata `authorization` on tandem.v1.Gateway). With no keys configured (the default) the API is
open. Health checks, reflection and /metrics never need a key: they are for operators and
orchestrators, as in vLLM (whose --api-key also guards only /v1).
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable
from pathlib import Path


class KeyCheck(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # keys are required and none was sent
    INVALID = "invalid"  # one was sent, and it is not one of ours


class ApiKeys:
    """The accepted keys. Immutable; `check` compares in constant time per key."""

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = tuple(k.encode() for k in keys)

    @classmethod
    def from_setting(cls, value: str) -> "ApiKeys":
        """`a,b,c` (comma-separated keys) or `@FILE` (one key a line; blank lines and lines
        starting with # are skipped); empty = no keys. Raises ValueError naming the problem."""
        value = value.strip()
        if not value:
            return cls()
        if value.startswith("@"):
            path = Path(value[1:])
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"api_keys: cannot read the key file {path}: {e.strerror or e}") from None
            keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not keys:
                raise ValueError(f"api_keys: the key file {path} holds no key (one a line)")
        else:
            keys = [k.strip() for k in value.split(",")]
            if any(not k for k in keys):
                raise ValueError("api_keys: an empty key in the comma-separated list")
        for k in keys:
            if not k.isprintable() or " " in k:
                raise ValueError("api_keys: keys must be printable and contain no spaces")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> KeyCheck:
        """Judge an `Authorization` value (None when absent). Does not mutate."""
        if not self._keys:
            return KeyCheck.OK
        if not authorization:
            return KeyCheck.MISSING
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return KeyCheck.INVALID
        presented = token.strip().encode()
        # compare against every key, so the time taken does not tell which one nearly matched
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return KeyCheck.OK if matched else KeyCheck.INVALID
