"""SamplingParams: what a request asks of the sampler and the stop checker (vLLM's field names).

Validation happens at construction, so a bad request is rejected before it touches the engine:
each error is a ValueError that names the field and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The engine's own bounds: what any caller (a worker called directly, the offline LLM) may ask.
# The gateway's configurable limits (services/common/config.py) are at most these.
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy
MAX_TEMPERATURE = 100.0  # far flatter than any use (OpenAI allows 2); beyond it every token is as likely
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value) -> str:
    """A value for an error message, cut short: messages quote what was sent, never all of it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0 in vLLM's older API is rejected here): no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (the sampled one is always included)
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {_show(self.max_tokens)}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {_show(self.temperature)}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {_show(self.top_p)}")
        if not _is_int(self.top_k) or self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {_show(self.top_k)}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2^64), got {_show(self.seed)}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_show(self.logprobs)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop[{i}] must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters, got {_show(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
        for i, t in enumerate(self.stop_token_ids):
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids[{i}] must be a non-negative integer, got {_show(t)}")

    @property
    def greedy(self) -> bool:
        # as vLLM: a temperature below GREEDY_TEMPERATURE is greedy, because dividing logits by
        # it overflows float32 (1e-30 turns every logit into ±inf and softmax into NaN) while the
        # distribution it stands for is argmax anyway
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
