"""Multi-turn conversations that resend their history, as a chat client does.

    turn 1:  [system][user 1]
    turn 2:  [system][user 1][assistant 1][user 2]
    turn 3:  [system][user 1][assistant 1][user 2][assistant 2][user 3]

Each conversation is one job: its turns run one after another (the next is built from the answer
to the previous one, after an optional think time), so with prefix caching every turn after the
first should find its history cached. In "tokens" format the history is token ids and the
assistant's part is the token ids the server streamed; in "text" format it is chat messages with
the streamed text, sent through the model's chat template. Everything but the answers (number of
turns, questions, output lengths, think times) is drawn when the conversation starts, so the
questions do not depend on what the server says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..distributions import Distribution
from .base import DEFAULT_VOCAB_SIZE, Job, Reply, RequestSpec, check_prompt_format, check_vocab_size, random_token_ids
from .text import random_words


class Conversation:
    """One conversation's turns; remembers the history (mutates on every next_request)."""

    def __init__(self, index: int, system: list[int] | str | None, questions: list, output_lens: list[int], delays: list[float]):
        self.index = index
        self._questions = questions  # token id lists, or strings (text format)
        self._output_lens = output_lens
        self._delays = delays
        self._text = isinstance(questions[0], str)
        self._turn = 0
        self._ids: list[int] = list(system or []) if not self._text else []
        self._messages: list[tuple[str, str]] = [("system", system)] if self._text and system else []

    @property
    def num_turns(self) -> int:
        return len(self._questions)

    def next_request(self, previous: Reply | None) -> RequestSpec | None:
        if previous is not None:
            if self._text:
                self._messages.append(("assistant", previous.text))
            else:
                self._ids.extend(previous.token_ids)
        if self._turn == self.num_turns:
            return None
        t, self._turn = self._turn, self._turn + 1
        tags = {"conversation": self.index, "turn": t}
        delay = self._delays[t]
        if self._text:
            self._messages.append(("user", self._questions[t]))
            return RequestSpec(self._output_lens[t], messages=list(self._messages), delay=delay, tags=tags)
        self._ids.extend(self._questions[t])
        return RequestSpec(self._output_lens[t], token_ids=list(self._ids), delay=delay, tags=tags)


@dataclass(frozen=True)
class MultiTurnWorkload:
    num_turns: Distribution
    question_len: Distribution
    output_len: Distribution
    system_prompt_len: int = 0  # 0 = no system prompt
    shared_system_prompt: bool = False  # every conversation starts with the same one
    turn_delay: Distribution = Distribution("fixed", 0.0)  # seconds between an answer and the next question
    vocab_size: int = DEFAULT_VOCAB_SIZE
    prompt_format: str = "tokens"
    seed: int = 0
    name: str = "multi-turn"

    def __post_init__(self) -> None:
        check_vocab_size(self.vocab_size)
        check_prompt_format(self.prompt_format)
        if self.system_prompt_len < 0:
            raise ValueError(f"system prompt length must be >= 0, got {self.system_prompt_len}")

    def _content(self, rng: np.random.Generator, n: int) -> list[int] | str:
        return random_words(rng, n) if self.prompt_format == "text" else random_token_ids(rng, n, self.vocab_size)

    def jobs(self) -> Iterator[Job]:
        rng = np.random.default_rng(self.seed)
        shared = self._content(rng, self.system_prompt_len) if self.shared_system_prompt and self.system_prompt_len else None
        index = 0
        while True:
            system = shared if self.shared_system_prompt else (self._content(rng, self.system_prompt_len) if self.system_prompt_len else None)
            turns = self.num_turns.sample_int(rng)
            questions = [self._content(rng, self.question_len.sample_int(rng)) for _ in range(turns)]
            output_lens = [self.output_len.sample_int(rng) for _ in range(turns)]
            delays = [0.0] + [self.turn_delay.sample(rng) for _ in range(turns - 1)]
            yield Conversation(index, system, questions, output_lens, delays)
            index += 1

    def describe(self) -> dict:
        return {
            "workload": self.name,
            "num_turns": str(self.num_turns),
            "question_len": str(self.question_len),
            "output_len": str(self.output_len),
            "system_prompt_len": self.system_prompt_len,
            "shared_system_prompt": self.shared_system_prompt,
            "turn_delay_s": str(self.turn_delay),
            "prompt_format": self.prompt_format,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
        }
