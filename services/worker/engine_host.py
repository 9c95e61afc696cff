"""EngineHost: one AsyncEngine inside a worker service, with what every worker adds around it.

It loads the engine off the event loop, publishes the engine's stats and KV events to
Worker.Watch subscribers through a WatchHub (load snapshots, KVEventLog batches), keeps the
vLLM-named metrics current, and wraps each generation with its latency metrics and a span.
Prefill and decode workers both use it. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from protos.tandem.v1 import common_pb2
from services.common.config import ServiceConfig
from services.common.metrics import WorkerMetrics
from services.common.telemetry import tracer
from services.common.watch_hub import WatchHub
from services.engine.kv_handoff import Handoff, KVImport

log = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.engine = None
        self.hub = WatchHub(config.worker_id)  # Worker.Watch: load snapshots and KV events
        self.metrics = WorkerMetrics(config.model)

    async def start(self) -> None:
        """Load the model (seconds; runs in a thread so health checks keep answering)."""
        from services.engine.async_engine import AsyncEngine
        from services.engine.engine_config import EngineConfig

        c = self.config
        engine_config = EngineConfig(
            model=c.model,
            dtype=c.dtype,
            block_size=c.block_size,
            kv_cache_memory_gb=c.kv_cache_gb,
            num_kv_blocks=c.num_kv_blocks or None,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_num_seqs=c.max_num_seqs,
            max_model_len=c.max_model_len or None,
            num_threads=c.threads or None,
        )
        self.engine = await asyncio.get_running_loop().run_in_executor(None, AsyncEngine, engine_config)
        self.hub.stats = self.engine.stats()
        self.kv_layout = self._layout()
        self.engine.set_observer(self._on_engine_update)
        e = self.engine
        log.info("engine ready: %s, %s, %d KV blocks of %d tokens", self.model_name, e.dtype_name, e.num_kv_blocks, e.config.block_size)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def kv_storage(self):
        """The paged KV cache tensor [layers, 2, kv heads, blocks, block size, head dim] (for kvtransfer)."""
        return self.engine.kv_storage

    @property
    def bytes_per_block(self) -> int:
        return self.engine.kv_bytes_per_block

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.set_observer(None)
            await self.engine.shutdown()
            self.engine = None

    # ---- registration -----------------------------------------------------------------------------

    def _layout(self) -> common_pb2.KVLayout:
        """What this engine's KV blocks mean; equal fingerprints may exchange blocks."""
        from kvtransfer.layout import layout_fingerprint

        engine = self.engine
        mc = engine.model_config
        dtype = engine.dtype_name
        model_id = engine.config.model_id or engine.config.model
        bs = engine.config.block_size
        return common_pb2.KVLayout(
            model_id=model_id, dtype=dtype, num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, block_size=bs,
            fingerprint=layout_fingerprint(model_id, dtype, mc.num_layers, mc.num_kv_heads, mc.head_dim, bs),
        )  # fmt: skip

    def fill_registration(self, reg: common_pb2.WorkerRegistration) -> None:
        engine = self.engine
        reg.model = self.model_name
        reg.kv_layout.CopyFrom(self.kv_layout)
        reg.block_size = engine.config.block_size
        reg.num_kv_blocks = engine.num_kv_blocks
        reg.max_num_seqs = engine.config.max_num_seqs
        reg.max_model_len = engine.max_model_len

    # ---- load and KV events -------------------------------------------------------------------

    async def engine_check_integrity(self) -> None:
        """The engine's invariants, checked between steps (AssertionError names the problem)."""
        await self.engine.check_integrity_live()

    def _on_engine_update(self, stats, events) -> None:
        self.metrics.num_requests_running.set(stats.num_running)
        self.metrics.num_requests_waiting.set(stats.num_waiting)
        self.metrics.kv_cache_usage.set(stats.kv_cache_usage)
        self.hub.publish(stats, events)

    # ---- generation -----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params, cache_salt: str | None, handoff: Handoff | None = None) -> AsyncIterator:
        """Queue a request; returns the engine's output stream wrapped with metrics and a span.
        `handoff`: work done elsewhere that the request continues (services/engine/kv_handoff.py).
        Raises ValueError (naming the field) for a request this engine cannot run."""
        stream = await self.engine.add_request(request_id, prompt_token_ids, params, cache_salt or None, handoff)
        return self._observed(request_id, stream, len(prompt_token_ids))

    async def _observed(self, request_id: str, stream, num_prompt: int) -> AsyncIterator:
        m = self.metrics
        start = last = time.perf_counter()
        first = True
        with tracer().start_as_current_span("engine.generate", attributes={"tandem.request_id": request_id, "tandem.prompt_tokens": num_prompt}) as span:
            try:
                async for out in stream:
                    if isinstance(out, KVImport):  # where an imported prompt's KV goes: for the service
                        yield out
                        continue
                    now = time.perf_counter()
                    if out.new_token_ids:
                        if first:
                            m.time_to_first_token.observe(now - start)
                            span.add_event("first_token", {"tandem.cached_tokens": out.num_cached_tokens})
                            first = False
                        else:
                            m.inter_token_latency.observe((now - last) / len(out.new_token_ids))
                        last = now
                    if out.finished:
                        m.generation_tokens.inc(len(out.token_ids))
                        m.e2e_request_latency.observe(now - start)
                        m.record_finished(out.finish_reason, num_prompt, out.num_cached_tokens)
                        span.set_attribute("tandem.completion_tokens", len(out.token_ids))
                        span.set_attribute("tandem.finish_reason", out.finish_reason)
                    yield out
            finally:
                await stream.aclose()
