"""A test hook that makes the engine thread fail on demand, in a real worker process.

    TANDEM_FAULT_ENGINE_AFTER_STEPS=N   the engine thread raises InjectedEngineFault before its
                                        (N+1)-th model step (N=0: before the first one)

It is read once, from the environment, when the engine starts, so only whoever starts the process
can arm it; no request can. Tests use it to prove that a worker whose engine dies leaves routing
at once, ends its in-flight requests with UNAVAILABLE and exits (tests/integration/
test_engine_failure.py). Never set it in production: the worker it is set on will die.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_AFTER_STEPS = "TANDEM_FAULT_ENGINE_AFTER_STEPS"


class InjectedEngineFault(RuntimeError):
    """The failure TANDEM_FAULT_ENGINE_AFTER_STEPS asked for."""


class EngineFault:
    """Counts the engine's steps and raises once the armed count is reached; a no-op when unarmed."""

    def __init__(self, after_steps: int | None):
        if after_steps is not None and after_steps < 0:
            raise ValueError(f"{ENV_AFTER_STEPS} must be a step count >= 0, got {after_steps}")
        self.after_steps = after_steps
        self.num_steps = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "EngineFault":
        raw = (os.environ if environ is None else environ).get(ENV_AFTER_STEPS, "").strip()
        if not raw:
            return cls(None)
        try:
            after = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_AFTER_STEPS} must be an integer step count, got {raw!r}") from None
        log.warning("fault injection armed: the engine thread will fail before step %d (%s)", after + 1, ENV_AFTER_STEPS)
        return cls(after)

    @property
    def armed(self) -> bool:
        return self.after_steps is not None

    def before_step(self) -> None:
        """Called by the engine thread before each model step; raises when the count is reached. Mutates."""
        if self.after_steps is None:
            return
        if self.num_steps >= self.after_steps:
            raise InjectedEngineFault(f"injected engine failure after {self.num_steps} steps ({ENV_AFTER_STEPS})")
        self.num_steps += 1
