"""What a workload hands the load runner: jobs, each a request or a conversation of requests.

    Workload.jobs() ──► Job, Job, Job, ...            endless, the same sequence for the same seed
    Job.next_request(None)        → the first RequestSpec
    Job.next_request(Reply)       → the next one, built from the previous turn's answer (or None: done)

A single-turn workload's jobs are `SingleRequest`s; a multi-turn conversation is one job whose later
prompts resend the history, including what the server answered. The runner calls `next_request`
again only after a turn succeeded, so a failed turn ends its conversation.

Prompts are token ids wherever the tokenizer does not matter (random ids in [0, vocab_size), so a
prefix is shared exactly in token space and block hashes line up), text or chat messages where it
does (the gateway tokenizes them). Everything is drawn from numpy Generators seeded by the
workload's seed: two calls of `jobs()` yield the same prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

PROMPT_FORMATS = ("tokens", "text")
DEFAULT_VOCAB_SIZE = 49152  # SmolLM2, the embedded default model


@dataclass
class RequestSpec:
    """One request to send: exactly one of token_ids, text or messages, and its output length."""

    max_tokens: int
    token_ids: list[int] | None = None
    text: str | None = None
    messages: list[tuple[str, str]] | None = None  # (role, content), sent through the chat template
    delay: float = 0.0  # seconds to wait before sending (think time between a conversation's turns)
    tags: dict[str, int] = field(default_factory=dict)  # where it came from: group, conversation, turn

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.token_ids, self.text, self.messages)) != 1:
            raise ValueError("a request has exactly one of token_ids, text or messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def prompt_kind(self) -> str:
        return "token_ids" if self.token_ids is not None else "text" if self.text is not None else "chat"

    @property
    def num_prompt_tokens(self) -> int | None:
        """Known before sending only for token ids; the server's usage reports it for text."""
        return len(self.token_ids) if self.token_ids is not None else None


@dataclass
class Reply:
    """What a turn produced: the next turn of a conversation resends it as the assistant's message."""

    token_ids: list[int]
    text: str


class Job(Protocol):
    def next_request(self, previous: Reply | None) -> RequestSpec | None:
        """The first request (previous None), then the next after each successful turn; None when
        done. Mutates the job (it remembers the history)."""


class Workload(Protocol):
    name: str

    def jobs(self) -> Iterator[Job]:
        """An endless stream of jobs, identical for identical settings and seed. Does not mutate."""

    def describe(self) -> dict:
        """The settings, as recorded in the result JSON."""


class SingleRequest:
    """A job of one request."""

    def __init__(self, spec: RequestSpec):
        self._spec: RequestSpec | None = spec

    def next_request(self, previous: Reply | None) -> RequestSpec | None:
        spec, self._spec = self._spec, None
        return spec


def random_token_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    """n ids drawn uniformly from [0, vocab_size). Advances rng."""
    return rng.integers(0, vocab_size, size=n).tolist()


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 2:
        raise ValueError(f"vocab size must be >= 2, got {vocab_size}")


def check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
