"""What a worker registers and hands kvtransfer comes from the engine's named accessors
(AsyncEngine.kv_storage, num_kv_blocks, vocab_size...), not from chains into its core: this checks
those accessors describe the engine actually loaded, against the KV tensor and the model itself."""

from __future__ import annotations

import json

import pytest

from kvtransfer.layout import layout_fingerprint
from protos.tandem.v1 import common_pb2
from services.common.config import ServiceConfig
from services.worker.engine_host import EngineHost


@pytest.fixture
async def host(tiny_llama):
    h = EngineHost(ServiceConfig(role="decode", model=str(tiny_llama), dtype="float32", block_size=8, num_kv_blocks=40, max_model_len=96, max_num_seqs=5))
    await h.start()
    yield h
    await h.close()


async def test_registration_describes_the_loaded_engine(host, tiny_llama):
    reg = common_pb2.WorkerRegistration()
    host.fill_registration(reg)
    storage = host.kv_storage  # [blocks, layers, 2, kv heads, block size, head dim]
    blocks, layers, _, kv_heads, block_size, head_dim = storage.shape
    assert (reg.block_size, reg.num_kv_blocks, reg.max_model_len, reg.max_num_seqs) == (8, 40, 96, 5)
    assert (blocks, block_size) == (reg.num_kv_blocks, reg.block_size)
    layout = reg.kv_layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype) == (layers, kv_heads, head_dim, 8, "float32")
    assert layout.fingerprint == layout_fingerprint(layout.model_id, "float32", layers, kv_heads, head_dim, 8)
    assert host.bytes_per_block == storage[0].nbytes
    assert host.max_model_len == 96
    assert host.vocab_size == json.loads((tiny_llama / "config.json").read_text())["vocab_size"]


async def test_max_model_len_defaults_to_the_models_context(tiny_llama):
    h = EngineHost(ServiceConfig(role="prefill", model=str(tiny_llama), num_kv_blocks=16))
    await h.start()
    try:
        assert h.max_model_len == json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    finally:
        await h.close()
