"""One request's timeline as the client saw it: the raw material of every metric.

    scheduled ─(client queue)─► send ──► chunk₁ (first token) ──► chunk₂ ── … ──► chunkₙ ──► end
                                 └──────────── TTFT ────────────┘└─ ITL ─┘        (usage, status)

Times are seconds on the client's monotonic clock (time.perf_counter) relative to the start of
the run. A chunk is one streamed GenerateResponse that carried token ids; a chunk may carry more
than one token (the server batches what one engine step made), so ITL is per chunk, as vLLM
measures it, and TPOT divides by the token count. `status` is the gRPC status code name, "OK"
only when the stream ended with a finish reason; the client-made statuses are listed below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# statuses the client assigns (the server's are gRPC status code names)
CANCELLED = "CANCELLED"  # the client gave up: interrupted, or still running when the drain timed out
INCOMPLETE = "INCOMPLETE"  # the stream closed OK without a finish reason
SERVER_ABORT = "FINISH_ABORT"  # the stream ended with finish_reason ABORT


@dataclass
class RequestRecord:
    index: int  # order of sending within the run (warm-up included)
    request_id: str
    job: int  # the job (conversation) it belongs to
    warmup: bool
    scheduled: float  # when the arrival process wanted it sent
    prompt_kind: str = "token_ids"
    tags: dict[str, int] = field(default_factory=dict)
    expected_prompt_tokens: int | None = None  # known for token-id prompts
    max_tokens: int = 0
    send: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of them
    end: float | None = None
    status: str | None = None  # None while running
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int | None = None  # from the server's usage
    cached_prompt_tokens: int | None = None
    completion_tokens: int | None = None
    output_token_ids: list[int] = field(default_factory=list, repr=False)
    output_text_parts: list[str] = field(default_factory=list, repr=False)

    # ---- what the metrics read ---------------------------------------------------------------

    @property
    def success(self) -> bool:
        return self.status == "OK"

    @property
    def num_prompt_tokens(self) -> int:
        """Server-reported when known, else the client's own count (0 for text it never saw tokenized)."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.expected_prompt_tokens or 0

    @property
    def num_output_tokens(self) -> int:
        """Server-reported completion tokens when known, else the token ids received."""
        return self.completion_tokens if self.completion_tokens is not None else sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        """Seconds from send to the first token; None when no token arrived."""
        if self.send is None or not self.chunk_times:
            return None
        return self.chunk_times[0] - self.send

    @property
    def e2el(self) -> float | None:
        """Seconds from send to the end of the stream."""
        if self.send is None or self.end is None:
            return None
        return self.end - self.send

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive token-bearing chunks (empty for a one-chunk stream)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1): the mean time per output token after the first,
        as vLLM defines it; None when the request produced at most one token."""
        ttft, e2el, n = self.ttft, self.e2el, self.num_output_tokens
        if ttft is None or e2el is None or n <= 1:
            return None
        return (e2el - ttft) / (n - 1)

    @property
    def queue_time(self) -> float | None:
        """Seconds the request waited in the client for a concurrency slot (or a late event loop)."""
        return None if self.send is None else max(0.0, self.send - self.scheduled)

    @property
    def text(self) -> str:
        return "".join(self.output_text_parts)

    def to_json(self) -> dict:
        """The full timeline, one line of requests.jsonl."""
        return {
            "index": self.index,
            "request_id": self.request_id,
            "job": self.job,
            "tags": self.tags,
            "warmup": self.warmup,
            "prompt_kind": self.prompt_kind,
            "scheduled": self.scheduled,
            "send": self.send,
            "first_token": self.chunk_times[0] if self.chunk_times else None,
            "chunk_times": self.chunk_times,
            "chunk_tokens": self.chunk_tokens,
            "end": self.end,
            "status": self.status,
            "error": self.error,
            "finish_reason": self.finish_reason,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.num_prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.num_output_tokens,
        }
