"""Shared-prefix groups: many prompts that start with the same "system prompt" (SGLang's
generated-shared-prefix dataset), the workload that measures prefix caching and cache-aware routing.

    group 0:  [system prompt 0 ........][question]     × prompts_per_group
    group 1:  [system prompt 1 ........][question]     × prompts_per_group
    ...

Prompts are token ids, so every prompt of a group begins with identical ids and its full KV blocks
hash identically on every worker (text would be re-tokenized, and BPE may merge across the
boundary). Each round sends every (group, prompt) pair once in a shuffled order, so the groups
interleave as they would in traffic; later rounds keep the system prompts and draw new questions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..distributions import Distribution
from .base import DEFAULT_VOCAB_SIZE, Job, RequestSpec, SingleRequest, check_vocab_size, random_token_ids


@dataclass(frozen=True)
class SharedPrefixWorkload:
    num_groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: Distribution
    output_len: Distribution
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seed: int = 0
    name: str = "shared-prefix"

    def __post_init__(self) -> None:
        check_vocab_size(self.vocab_size)
        if self.num_groups < 1 or self.prompts_per_group < 1:
            raise ValueError(f"shared-prefix needs >= 1 group and >= 1 prompt per group, got {self.num_groups} and {self.prompts_per_group}")
        if self.system_prompt_len < 1:
            raise ValueError(f"system prompt length must be >= 1 token, got {self.system_prompt_len}")

    def system_prompts(self) -> list[list[int]]:
        """Each group's shared prefix (the same list `jobs()` uses). Does not mutate."""
        rng = np.random.default_rng(self.seed)
        return [random_token_ids(rng, self.system_prompt_len, self.vocab_size) for _ in range(self.num_groups)]

    def jobs(self) -> Iterator[Job]:
        rng = np.random.default_rng(self.seed)
        prefixes = [random_token_ids(rng, self.system_prompt_len, self.vocab_size) for _ in range(self.num_groups)]
        pairs = [g for g in range(self.num_groups) for _ in range(self.prompts_per_group)]
        while True:
            for g in rng.permutation(pairs).tolist():
                question = random_token_ids(rng, self.question_len.sample_int(rng), self.vocab_size)
                spec = RequestSpec(self.output_len.sample_int(rng), token_ids=prefixes[g] + question, tags={"group": g})
                yield SingleRequest(spec)

    def describe(self) -> dict:
        return {
            "workload": self.name,
            "num_groups": self.num_groups,
            "prompts_per_group": self.prompts_per_group,
            "system_prompt_len": self.system_prompt_len,
            "question_len": str(self.question_len),
            "output_len": str(self.output_len),
            "vocab_size": self.vocab_size,
            "seed": self.seed,
        }
