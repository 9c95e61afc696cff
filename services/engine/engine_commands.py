"""What the event loop asks of the engine thread (AsyncEngine's inbox), one type a command.

The loop side appends them under AsyncEngine's lock; the engine thread takes the whole inbox
between steps and applies them in order (`match` on the type), so an abort queued after an add
always finds its request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .kv_handoff import Handoff
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    handoff: Handoff | None


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class KVImported:
    """The KVImport's blocks are written (ok), or will not be (recompute the prompt)."""

    request_id: str
    ok: bool


@dataclass(frozen=True)
class ReleasePinned:
    request_id: str


@dataclass(frozen=True)
class CheckIntegrity:
    """Check the invariants between steps; the answer settles `done` on `loop`."""

    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


EngineCommand = AddRequest | Abort | KVImported | ReleasePinned | CheckIntegrity
