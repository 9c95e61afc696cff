"""Decides after each sampled token whether a request is done, and keeps its text.

Order of checks (as vLLM): EOS (unless ignore_eos), stop token ids, stop strings, max_tokens,
the model's context length. Stop strings need text, so a request with stop strings (or one that
asked for text) carries an incremental detokenizer. While streaming, the last
`longest stop string - 1` characters are held back, so a client never sees the beginning of a stop
string that the next token completes.
"""

from __future__ import annotations

from services.model_files.tokenizer import IncrementalDetokenizer

from .request import FinishReason, Request


class TextState:
    """A request's detokenized output and how much of it has been handed out."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: list[str], include_stop: bool):
        self.detokenizer = detokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add_token(self, token_id: int) -> str | None:
        """Append a token's text; return the stop string it completed, if any (text is then cut)."""
        delta = self.detokenizer.step(token_id)
        if not delta:
            return None
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
                return s
        return None

    def take_delta(self, finished: bool) -> str:
        """The text not handed out yet, minus the held-back tail unless the request is finished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


def check_stop(req: Request, token_id: int, text: TextState | None, max_model_len: int) -> None:
    """Set req.finish_reason / stop_reason if `token_id` (already appended) ends the request. Mutates req."""
    p = req.params
    if not p.ignore_eos and token_id in req.eos_token_ids:
        req.finish_reason = FinishReason.STOP
        return
    if token_id in p.stop_token_ids:
        req.finish_reason, req.stop_reason = "stop", token_id
        return
    if text is not None:
        hit = text.add_token(token_id)
        if hit is not None:
            req.finish_reason, req.stop_reason = "stop", hit
            return
    if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_model_len:
        req.finish_reason = FinishReason.LENGTH
