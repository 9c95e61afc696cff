"""Bounded polling for integration tests: every wait has a deadline and says what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.05) -> T:
    """Call probe() until it returns something truthy; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last probe: {last!r})")


async def eventually(probe: Callable[[], object], what: str, timeout: float = 10.0, interval: float = 0.02):
    """wait_for for the event loop, the one polling helper of async tests: await probe() (a plain or an
    async function) until it returns something truthy, sleeping with asyncio so the loop's tasks run
    meanwhile; raise AssertionError naming `what` after `timeout` seconds."""
    import asyncio

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last probe: {last!r})")
