"""Random prompts: input and output lengths drawn from distributions (vLLM's `random` dataset).

Token ids are uniform over the vocabulary, so two prompts share no prefix (no cache hits): the
workload that measures raw prefill and decode. With prompt_format "text" the prompts are words
(about one token each) and go through the gateway's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..distributions import Distribution
from .base import DEFAULT_VOCAB_SIZE, Job, RequestSpec, SingleRequest, check_prompt_format, check_vocab_size, random_token_ids
from .text import random_words


@dataclass(frozen=True)
class RandomWorkload:
    input_len: Distribution
    output_len: Distribution
    vocab_size: int = DEFAULT_VOCAB_SIZE
    prompt_format: str = "tokens"
    seed: int = 0
    name: str = "random"

    def __post_init__(self) -> None:
        check_vocab_size(self.vocab_size)
        check_prompt_format(self.prompt_format)

    def jobs(self) -> Iterator[Job]:
        rng = np.random.default_rng(self.seed)
        while True:
            n_in = self.input_len.sample_int(rng)
            n_out = self.output_len.sample_int(rng)
            if self.prompt_format == "text":
                yield SingleRequest(RequestSpec(n_out, text=random_words(rng, n_in)))
            else:
                yield SingleRequest(RequestSpec(n_out, token_ids=random_token_ids(rng, n_in, self.vocab_size)))

    def describe(self) -> dict:
        return {
            "workload": self.name,
            "input_len": str(self.input_len),
            "output_len": str(self.output_len),
            "prompt_format": self.prompt_format,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
        }
