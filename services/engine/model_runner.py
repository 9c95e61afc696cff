"""Runs one scheduled step on the model: flat inputs in, one sampled token per finished-prefill row out.

It owns the model weights, the KV cache memory and the attention backend; the scheduler owns
which blocks are whose. Decodes are placed first in the flat batch (the backend contract).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention.backend import SequenceSlice, select_backend
from .cpu_kernels import load_greedy_argmax
from .kv_cache import KVCache
from .model_config import ModelConfig
from .models.llama import LlamaForCausalLM
from .request import Logprob, Request
from .sampler import SamplingFailure, sample
from .scheduler import ScheduledRequest
from .weights import load_weights


@dataclass
class StepResult:
    sampled: list[tuple[Request, int | SamplingFailure, Logprob | None]]  # requests that completed their tokens, with the next token (or why it has none)
    num_tokens: int


class ModelRunner:
    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype, num_blocks: int, block_size: int, device: str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.block_size = block_size
        self.device = torch.device(device)
        self.model = LlamaForCausalLM(cfg, load_weights(model_dir, cfg, dtype), dtype)
        self.kv_cache = KVCache(cfg, num_blocks, block_size, dtype, device)
        self.backend = select_backend(self.device)
        if self.device.type == "cpu":
            load_greedy_argmax()  # built (or loaded from its cache) now, not inside the first request's step
        self.num_forward_tokens = 0  # tokens run through the model since start (prefill + decode)

    def execute(self, scheduled: list[ScheduledRequest]) -> StepResult:
        # decodes (one new token) first, as the attention backend expects
        ordered = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        for s in ordered:
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            if n == 1 and start == req.num_tokens - 1:
                input_ids.append(req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1])
            else:
                input_ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slices.append(SequenceSlice(len(input_ids) - n, n, start + n, req.block_ids))
            if start + n == req.num_tokens:
                logits_rows.append(len(input_ids) - 1)
                sampling.append(req)

        num_tokens = len(input_ids)
        meta = self.backend.build_metadata(slices, num_tokens, self.block_size)
        logits = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv_cache.layers,
            meta,
            self.backend,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        self.num_forward_tokens += num_tokens
        if not sampling:
            return StepResult([], num_tokens)
        tokens, logprobs = sample(logits.cpu(), sampling)
        return StepResult(list(zip(sampling, tokens, logprobs)), num_tokens)
