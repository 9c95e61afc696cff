"""The OpenAI response objects, built from the gateway's GenerateResponse chunks.

    /v1/completions        text_completion        choices[i].text, .logprobs {tokens, token_logprobs, top_logprobs, text_offset}
    /v1/chat/completions   chat.completion        choices[i].message {role, content}, .logprobs {content: [...]}
                           chat.completion.chunk  choices[i].delta {role} first, then {content}
    usage: prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details.cached_tokens
           (prompt tokens whose KV came from a prefix cache, as vLLM reports them)

Beside OpenAI's fields a choice carries vLLM's `stop_reason` (the stop string or token id that
ended it) and, when the request asked `return_token_ids`, `token_ids`. A streamed choice's last
chunk has its finish_reason; with `stream_options.include_usage` every chunk has `usage: null`
and one more chunk with no choices carries the usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.tandem.v1 import common_pb2

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_ABORT: "abort"}


def stop_reason(chunk: common_pb2.GenerateResponse) -> str | int | None:
    which = chunk.WhichOneof("stop_reason")
    return getattr(chunk, which) if which else None


def _logprob(value: float) -> float:
    """JSON has no -inf: a token the model rules out gets vLLM's floor instead."""
    return max(value, -9999.0)


def usage_json(usages: list[common_pb2.Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_prompt_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class ChoiceState:
    """One choice as it streams in: what has been seen so far (mutated by `add`)."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    num_token_chars: int = 0  # the completion logprobs' text_offset so far
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: common_pb2.Usage | None = None

    def add(self, chunk: common_pb2.GenerateResponse, texts: dict[int, str]) -> None:
        """Take in the next chunk; `texts` names its logprobs' tokens (empty without logprobs)."""
        self.text_parts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.num_token_chars += sum(len(texts[e.token_id]) for e in chunk.logprobs if e.token_id in texts)
        if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH_REASONS.get(chunk.finish_reason, "stop")
            self.stop_reason = stop_reason(chunk)
        if chunk.HasField("usage"):
            self.usage = chunk.usage


class Responder:
    """Builds one request's response objects (one id, model and creation time for all chunks)."""

    def __init__(self, kind: str, response_id: str, model: str, created: int, num_logprobs: int | None, return_token_ids: bool):
        self.kind, self.id, self.model, self.created = kind, response_id, model, created
        self.num_logprobs, self.return_token_ids = num_logprobs, return_token_ids

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    # ---- logprobs ---------------------------------------------------------------------------------

    def logprob_ids(self, entries) -> set[int]:
        """The token ids whose text the logprobs of `entries` name."""
        return {e.token_id for e in entries} | {t.token_id for e in entries for t in e.top}

    def _completion_logprobs(self, entries, texts: dict[int, str], offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            token = texts[e.token_id]
            out["tokens"].append(token)
            out["token_logprobs"].append(_logprob(e.logprob))
            top = {texts[t.token_id]: _logprob(t.logprob) for t in e.top}
            top.setdefault(token, _logprob(e.logprob))  # the sampled token is always listed, as in vLLM
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(token)
        return out

    def _chat_logprobs(self, entries, texts: dict[int, str]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            token = texts[token_id]
            return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}

        content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t.token_id, t.logprob) for t in e.top[: self.num_logprobs]]} for e in entries]
        return {"content": content}

    def _logprobs(self, entries, texts: dict[int, str], offset: int) -> dict | None:
        if self.num_logprobs is None:
            return None
        return self._completion_logprobs(entries, texts, offset) if self.kind == "completion" else self._chat_logprobs(entries, texts)

    # ---- streaming --------------------------------------------------------------------------------

    def role_chunk(self, index: int, include_usage: bool) -> dict:
        """Chat streams open each choice with the assistant's role, as OpenAI does."""
        body = self._envelope(
            "chat.completion.chunk", [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )
        return {**body, "usage": None} if include_usage else body

    def chunk(self, state: ChoiceState, chunk: common_pb2.GenerateResponse, texts: dict[int, str], include_usage: bool) -> dict:
        """The streamed form of `chunk`, before `state.add(chunk)` (its offsets count from there)."""
        choice: dict = {"index": state.index}
        if self.kind == "completion":
            choice["text"] = chunk.text
        else:
            choice["delta"] = {"content": chunk.text} if chunk.text else {}
        choice["logprobs"] = self._logprobs(chunk.logprobs, texts, state.num_token_chars)
        finished = chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        choice["finish_reason"] = FINISH_REASONS.get(chunk.finish_reason, "stop") if finished else None
        choice["stop_reason"] = stop_reason(chunk) if finished else None
        if self.return_token_ids:
            choice["token_ids"] = list(chunk.token_ids)
        body = self._envelope("text_completion" if self.kind == "completion" else "chat.completion.chunk", [choice])
        return {**body, "usage": None} if include_usage else body

    def usage_chunk(self, usages: list[common_pb2.Usage]) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {**self._envelope(obj, []), "usage": usage_json(usages)}

    # ---- whole responses --------------------------------------------------------------------------

    def full(self, states: list[ChoiceState], texts: dict[int, str]) -> dict:
        choices = []
        for s in states:
            text = "".join(s.text_parts)
            choice: dict = {"index": s.index}
            if self.kind == "completion":
                choice["text"] = text
            else:
                choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = self._logprobs(s.logprobs, texts, 0)
            choice["finish_reason"] = s.finish_reason
            choice["stop_reason"] = s.stop_reason
            if self.return_token_ids:
                choice["token_ids"] = s.token_ids
            choices.append(choice)
        body = self._envelope("text_completion" if self.kind == "completion" else "chat.completion", choices)
        body["usage"] = usage_json([s.usage for s in states if s.usage is not None])
        return body
