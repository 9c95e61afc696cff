"""The offline entry point, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .engine_config import EngineConfig
from .engine_core import EngineCore, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "default", dtype: str = "auto", **engine_args):
        # offline work favours few large steps (as vLLM's LLM class does): better matmul
        # efficiency, and no tail of small decode batches from staggered starts
        engine_args.setdefault("max_num_batched_tokens", 8192)
        self.engine = EngineCore(EngineConfig(model=model, dtype=dtype, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in input order.

        Either `prompts` (text, tokenized here) or `prompt_token_ids`. A bad prompt raises ValueError
        before anything is queued."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.engine.tokenizer is None:
                raise ValueError("this model directory has no tokenizer.json; pass prompt_token_ids")
            token_lists = [self.engine.tokenizer.encode(p) for p in prompts]
        else:
            token_lists = [list(t) for t in prompt_token_ids]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(token_lists)} prompts")

        ids = [f"offline-{next(self._ids)}" for _ in token_lists]
        added: list[str] = []
        try:
            for rid, toks, p in zip(ids, token_lists, params_list):
                self.engine.add_request(rid, toks, p)
                added.append(rid)
        except ValueError:
            for rid in added:
                self.engine.abort(rid)
            self.engine.step()  # drain the abort outputs
            raise
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
        return [finals[rid] for rid in ids]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One chat conversation through the model's chat template."""
        if self.engine.tokenizer is None:
            raise ValueError("this model directory has no tokenizer.json")
        text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return self.generate(prompt_token_ids=[ids], sampling_params=sampling_params)[0]
