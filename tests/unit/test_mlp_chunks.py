"""A large step's MLP runs in row chunks (DecoderLayer.mlp): the result must not depend on the chunking."""

from __future__ import annotations

import pytest
import torch

from services.engine.model_config import ModelConfig
from services.engine.models.llama import MLP_CHUNK_BYTES, MLP_MIN_CHUNK_ROWS, LlamaForCausalLM, mlp_chunk_rows
from services.engine.weights import load_weights


def test_chunk_rows_keep_the_activation_under_the_budget():
    # SmolLM2-135M: gate/up is [2 x 1536, 576]; its 6 MB output stays in cache for the next two ops
    assert mlp_chunk_rows(3072, 4) == 512
    assert mlp_chunk_rows(3072, 2) == 1024
    for width, size in ((3072, 4), (28672, 2), (28672, 4), (10, 4)):
        rows = mlp_chunk_rows(width, size)
        assert rows % 64 == 0 and rows >= MLP_MIN_CHUNK_ROWS
        assert rows == MLP_MIN_CHUNK_ROWS or rows * width * size <= MLP_CHUNK_BYTES
    # an 8B model's MLP: the floor, and still under glibc's 32 MiB mmap threshold
    assert mlp_chunk_rows(28672, 4) == MLP_MIN_CHUNK_ROWS and MLP_MIN_CHUNK_ROWS * 28672 * 4 < 32 << 20
    assert mlp_chunk_rows(10**9, 4) == MLP_MIN_CHUNK_ROWS  # never fewer rows than a matmul runs well on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_mlp_matches_one_pass(tiny_llama, dtype):
    cfg = ModelConfig.from_dir(tiny_llama)
    model = LlamaForCausalLM(cfg, load_weights(tiny_llama, cfg, dtype), dtype)
    layer = model.layers[0]
    h = torch.randn(200, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer.mlp_rows = 1 << 30
    whole = layer.mlp(h, model.ops)
    layer.mlp_rows = 64  # 64 + 64 + 64 + 8 rows: the last chunk is short
    chunked = layer.mlp(h, model.ops)
    assert chunked.shape == whole.shape == (200, cfg.hidden_size) and chunked.dtype == dtype
    # the same rows through the same weights; only the matmul's blocking over M may differ
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(chunked, whole, atol=tol, rtol=tol)
