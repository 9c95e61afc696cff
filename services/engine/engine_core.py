"""EngineCore: the synchronous heart shared by the offline LLM and the async engine.

add_request validates and queues; step() schedules, runs the model, samples, checks stops, frees
what finished and returns what changed. Nothing here is thread-safe: the async engine drives it
from one thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from services.model_files.model_dir import resolve_model_dir
from services.model_files.tokenizer import Tokenizer

from .engine_config import EngineConfig
from .kv_cache import KVCache
from .kv_cache_manager import KVCacheManager
from .kv_handoff import Handoff, KVImport, PinnedKV
from .malloc_tuning import tune_malloc
from .model_config import ModelConfig, parse_dtype
from .model_runner import ModelRunner
from .request import FinishReason, Logprob, Request
from .sampler import SamplingFailure
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .stop_checker import TextState, check_stop

NO_HANDOFF = Handoff()  # an ordinary request
MAX_CACHE_SALT_CHARS = 1024  # the salt seeds the prefix-cache hashes; any longer is only memory


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    new_token_ids: list[int]  # generated since the previous output for this request
    text: str  # generated text so far (stop string removed unless include_stop_str_in_output)
    delta_text: str
    finished: bool
    finish_reason: FinishReason | None = None  # ERROR: see `error`
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[Logprob] = field(default_factory=list)  # one per generated token so far, when asked
    pinned_kv: PinnedKV | None = None  # a prefill_only request's KV, held for a decode worker
    # finish_reason "error": why this request alone failed (its sampling parameters gave no valid
    # distribution); the worker ends its stream with INVALID_ARGUMENT and this message
    error: str | None = None


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.device == "cpu":
            tune_malloc()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_dir = resolve_model_dir(config.model)
        self.model_dir = model_dir
        self.model_config = ModelConfig.from_dir(model_dir)
        dtype = self.model_config.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
        if dtype == torch.float16 and config.device == "cpu":
            dtype = torch.bfloat16  # fp16 matmuls are slow and overflow-prone on CPU; bf16 keeps the range
        self.dtype = dtype
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings, self.model_config.max_position_embeddings)
        num_blocks = config.num_kv_blocks or KVCache.blocks_for_memory(self.model_config, config.block_size, dtype, config.kv_cache_memory_gb * 2**30)
        self.tokenizer = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.runner = ModelRunner(str(model_dir), self.model_config, dtype, num_blocks, config.block_size, config.device)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.model_id or config.model, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.requests: dict[str, Request] = {}
        self._text: dict[str, TextState] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.pinned: dict[str, PinnedKV] = {}  # prefilled prompts held for decode workers
        self.importing: dict[str, Request] = {}  # requests waiting for their prompt KV (not scheduled)

    # ---- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        detokenize: bool = True,
        *,
        handoff: Handoff | None = None,
    ) -> Request:
        """Validate and queue a request. Raises ValueError (naming the field) and allocates nothing on bad input.

        `handoff` (kv_handoff.py) continues work done elsewhere: a prefill-only request ends after
        its first token and pins its prompt's KV; output tokens generated elsewhere (their text was
        already streamed) are taken as this request's own; an import_kv request allocates the
        prompt's blocks now and waits for complete_kv_import() — kv_import(request_id) says where to write."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params, cache_salt)
        handoff = handoff or NO_HANDOFF
        req = Request(request_id, list(prompt_token_ids), params, time.monotonic(), self.eos_token_ids, cache_salt)
        req.prefill_only = handoff.prefill_only
        req.output_token_ids = list(handoff.output_token_ids)
        if req.generator is not None and not params.greedy:
            # the tokens sampled elsewhere (a prefill worker; a decode worker that died mid-stream)
            # drew from this seed's generator there: skip past those draws, so the next token is
            # the one an uninterrupted run draws (a draw consumes state by vocabulary size only)
            uniform = torch.ones(self.model_config.vocab_size)
            for _ in req.output_token_ids:
                torch.multinomial(uniform, 1, generator=req.generator)
        self.requests[request_id] = req
        if self.tokenizer is not None and (detokenize or params.stop):
            detok = self.tokenizer.decode_stream(req.prompt_token_ids, params.skip_special_tokens)
            text = self._text[request_id] = TextState(detok, params.stop, params.include_stop_str_in_output)
            for t in req.output_token_ids:  # already streamed by the worker that sampled them
                text.add_token(t)
            text.take_delta(False)
        if handoff.import_kv and self._allocate_import(req):
            self.importing[request_id] = req
        else:
            self.scheduler.add(req)  # no room to import (or nothing asked): computed here instead
        return req

    def _allocate_import(self, req: Request) -> bool:
        """Give `req` blocks for its whole prompt, reusing this engine's cached prefix. Mutates."""
        hits, num_hit_tokens = self.kv.get_computed_blocks(req)
        if not self.kv.allocate_slots(req, req.num_prompt_tokens - num_hit_tokens, hits):
            return False
        req.num_cached_tokens = num_hit_tokens
        return True

    def kv_import(self, request_id: str) -> KVImport | None:
        """Where an import_kv request's missing prompt KV goes; None if it is computed here instead."""
        req = self.importing.get(request_id)
        if req is None:
            return None
        return KVImport(request_id, tuple(req.block_ids), req.num_cached_tokens, self.config.block_size)

    def complete_kv_import(self, request_id: str, ok: bool) -> None:
        """The prompt KV of an import_kv request was written (ok) or will not come (recompute it
        here, from this engine's prefix cache). Mutates; a request aborted meanwhile is ignored."""
        req = self.importing.pop(request_id, None)
        if req is None:
            return
        if ok:
            req.num_computed_tokens = req.num_prompt_tokens
            self.kv.cache_computed_blocks(req)  # the imported full blocks are now valid prefix cache
        else:
            self.kv.free(req)
            req.num_cached_tokens = None  # counted again when it is scheduled
        self.scheduler.add(req)

    def release_pinned(self, request_id: str) -> bool:
        """Let go of a prefilled prompt's blocks (they stay in the prefix cache). Mutates."""
        pinned = self.pinned.pop(request_id, None)
        if pinned is None:
            return False
        self.kv.pool.free(list(reversed(pinned.block_ids)))
        return True

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None) -> None:
        """Raise ValueError (naming the field and its range) if this request can never run here.

        Reads only fixed configuration, so other threads may call it (AsyncEngine does). The
        length is checked before the ids, so a huge prompt is refused without a pass over it."""
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty (got 0 tokens)")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt is {n} tokens but the model's context (max_model_len) is {self.max_model_len}; "
                f"it must be at most {self.max_model_len - 1} tokens to leave room for one output token"
            )
        vocab = self.model_config.vocab_size
        for i, t in enumerate(prompt_token_ids):
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids[{i}] = {t!r} is outside the vocabulary [0, {vocab})")
        if cache_salt is not None and len(cache_salt) > MAX_CACHE_SALT_CHARS:
            raise ValueError(f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters, got {len(cache_salt)}")
        worst_case = min(n + params.max_tokens, self.max_model_len)
        blocks = -(-worst_case // self.config.block_size)
        if blocks > self.kv.pool.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({worst_case} tokens) needs {blocks} KV blocks but the cache has "
                f"{self.kv.pool.num_blocks}; lower max_tokens or give the KV cache more memory"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model directory has no tokenizer.json")

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks are freed and a final 'abort' output is queued."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = FinishReason.ABORT
        self.importing.pop(request_id, None)
        self._finish(req)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending_outputs)

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        if not self.scheduler.has_work():
            return outputs
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return outputs
        result = self.runner.execute(sched.scheduled)
        now = time.monotonic()
        for s in sched.scheduled:
            self.kv.cache_computed_blocks(s.request)
        for req, token, logprob in result.sampled:
            if isinstance(token, SamplingFailure):  # this request alone fails; the batch goes on
                req.finish_reason = FinishReason.ERROR
                out = self._finish(req, queue=False)
                out.error = token.message
                outputs.append(out)
                continue
            req.output_token_ids.append(token)
            if logprob is not None:
                req.output_logprobs.append(logprob)
            if req.first_token_time is None:
                req.first_token_time = now
            text = self._text.get(req.request_id)
            check_stop(req, token, text, self.max_model_len)
            if req.finish_reason is not None:
                outputs.append(self._finish(req, queue=False))
            elif req.prefill_only:
                outputs.append(self._finish(req, queue=False, pin=True))
            else:
                outputs.append(self._output(req, [token]))
        return outputs

    def _output(self, req: Request, new_tokens: list[int]) -> RequestOutput:
        text = self._text.get(req.request_id)
        finished = req.finish_reason is not None
        delta = text.take_delta(finished) if text else ""
        return RequestOutput(
            req.request_id,
            req.prompt_token_ids,
            list(req.output_token_ids),
            new_tokens,
            text.text if text else "",
            delta,
            finished,
            req.finish_reason,
            req.stop_reason,
            min(req.num_cached_tokens or 0, req.num_prompt_tokens),  # a resumed request's hits may cover its output too
            list(req.output_logprobs),
        )

    def _finish(self, req: Request, queue: bool = True, pin: bool = False) -> RequestOutput:
        """End a request: free its blocks, or with `pin` hold its prompt's blocks in self.pinned."""
        pinned = None
        if pin:
            num_prompt_blocks = -(-req.num_prompt_tokens // self.config.block_size)
            pinned = PinnedKV(
                req.request_id,
                tuple(req.block_ids[:num_prompt_blocks]),
                tuple(req.block_hashes[: req.num_prompt_tokens // self.config.block_size]),
                req.num_prompt_tokens,
            )
            self.kv.pool.touch(list(pinned.block_ids))  # one more reference: survives the free below
            self.pinned[req.request_id] = pinned
        self.scheduler.finish(req)
        new = [req.output_token_ids[-1]] if (req.output_token_ids and req.finish_reason not in (FinishReason.ABORT, FinishReason.ERROR)) else []
        out = self._output(req, new)
        out.finished, out.pinned_kv = True, pinned
        del self.requests[req.request_id]
        self._text.pop(req.request_id, None)
        if queue:
            self._pending_outputs.append(out)
        return out

    def check_integrity(self) -> None:
        """The pool is consistent, and with no request alive every block is free."""
        self.kv.check_integrity()
        assert set(self.importing) <= set(self.requests), "an importing request is not alive"
        if not self.requests:
            pinned = {b for p in self.pinned.values() for b in p.block_ids}
            used = {b.block_id for b in self.kv.pool.blocks if b.ref_count > 0}
            assert used == pinned, f"{len(used - pinned)} KV blocks still held with no request alive and not pinned"
