"""A request's state inside the engine: its tokens, how far its KV is computed, and its blocks.

The engine treats prefill and decode uniformly (as vLLM v1 does): each step computes
`all_token_ids[num_computed_tokens:]` (or a chunk of it). When a step brings num_computed_tokens up
to num_tokens, the sampler appends one token and the request needs one more step. A preempted
request simply drops its blocks and returns to num_computed_tokens = 0; its prompt is now
prompt + output so far, recomputed (often from the prefix cache).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a request ended (a str: it compares and serialises as its value, as vLLM's strings do)."""

    STOP = "stop"  # an EOS or stop token, or a stop string
    LENGTH = "length"  # max_tokens, or the model's context
    ABORT = "abort"  # the caller gave up (client gone, deadline, cancelled)
    ERROR = "error"  # this request alone failed (RequestOutput.error says why)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-n (token id, logprob), best first


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    cache_salt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Logprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache at first schedule; None = not scheduled yet
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks of all_token_ids
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    prefill_only: bool = False  # finish after the first sampled token and pin the prompt's KV blocks

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
