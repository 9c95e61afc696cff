"""The fused elementwise layer kernels (csrc/fused_elementwise.cpp) against the torch steps they replace,
and the engine giving the same tokens with either."""

from __future__ import annotations

import pytest
import torch

from services.engine.cpu_kernels import load_fused_elementwise
from services.engine.model_config import RopeConfig
from services.engine.models.layer_ops import FusedLayerOps, TorchLayerOps, select_layer_ops
from services.engine.models.rope import RotaryEmbedding
from tests.helpers.kernels import require_kernel


@pytest.fixture(scope="module")
def kernels():
    return require_kernel(load_fused_elementwise(), "the fused elementwise CPU kernels")


def ops_pair(kernels, dtype, head_dim=64):
    rope = RotaryEmbedding(RopeConfig(theta=100000.0), head_dim, 4096, dtype)
    return TorchLayerOps(rope, 1e-5), FusedLayerOps(rope, 1e-5, kernels)


def assert_matches(got, want, dtype):
    """float32: within float rounding of a differently associated sum; bfloat16: the same values but for
    a rare rounding flip of a sum-dependent step (at most 1 in 1,000 elements; the normalised value and
    then its product with the weight are each rounded, so a flip moves the result by up to 2 bf16 steps)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        return
    diff = (got.float() - want.float()).abs()
    assert (diff > 0).float().mean().item() <= 1e-3, f"{int((diff > 0).sum())} of {diff.numel()} elements differ"
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-6)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_norms_and_residual(kernels, dtype, rows):
    ref, fused = ops_pair(kernels, dtype)
    gen = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, 576, generator=gen).to(dtype) * 3 for _ in range(2))
    w = torch.randn(576, generator=gen).to(dtype)
    want_h, want_r = ref.add_rms_norm(x, residual, w)
    got_h, got_r = fused.add_rms_norm(x, residual.clone(), w)
    assert torch.equal(got_r, want_r)  # the residual add is one rounding either way
    assert_matches(got_h, want_h, dtype)
    assert_matches(fused.rms_norm(x, w), ref.rms_norm(x, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rope_in_place_on_a_strided_view(kernels, dtype, rows):
    """q and k are views into the fused qkv projection's output (non-contiguous rows)."""
    ref, fused = ops_pair(kernels, dtype)
    gen = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (9 + 3 + 3) * 64, generator=gen).to(dtype)
    q, k, v = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q, k, v = q.reshape(rows, 9, 64), k.reshape(rows, 3, 64), v.reshape(rows, 3, 64)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    want_q, want_k = ref.rope(q.clone(), k.clone(), ref.prepare(positions))
    v_before = v.clone()
    got_q, got_k = fused.rope(q, k, fused.prepare(positions))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)  # the same roundings
    assert torch.equal(v, v_before)  # V, beside them in the buffer, untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rope_over_the_leading_q_and_k_heads_of_a_qkv_row_in_one_pass(kernels, dtype, rows):
    """The layer rotates q's and k's heads together where they lead each fused qkv row: the same
    values as rotating q and k apart, and V's heads behind them untouched."""
    ref, fused = ops_pair(kernels, dtype)
    assert fused.rotates_in_place and not ref.rotates_in_place
    gen = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, 9 + 3 + 3, 64, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    q, k, v = qkv.clone().split_with_sizes([9, 3, 3], 1)
    want_q, want_k = ref.rope(q, k, ref.prepare(positions))
    fused.rope_leading_heads_(qkv, 9 + 3, fused.prepare(positions))
    got_q, got_k, got_v = qkv.split_with_sizes([9, 3, 3], 1)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(got_v, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_silu_and_mul(kernels, dtype, rows):
    ref, fused = ops_pair(kernels, dtype)
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, generator=gen).to(dtype) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero inputs
    assert_matches(fused.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), dtype)


def test_bad_shapes_raise_instead_of_reading_out_of_bounds(kernels):
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), 16, 8, torch.float32)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="positions\\[1\\] = 8 outside"):
        kernels.rope_(torch.randn(2, 1, 16), 1, torch.tensor([0, 8]), rope.cos, rope.sin)
    with pytest.raises(RuntimeError, match="must be even"):
        kernels.silu_and_mul(torch.randn(2, 5))


def test_selected_only_where_they_apply(kernels):
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), 16, 8, torch.float32)
    assert isinstance(select_layer_ops(rope, 1e-5, torch.float32, torch.device("cpu")), FusedLayerOps)
    assert type(select_layer_ops(rope, 1e-5, torch.float16, torch.device("cpu"))) is TorchLayerOps


def run_both(llm, prompts, params):
    """The engine's outputs with the fused steps, then with the torch steps, on the same engine."""
    model = llm.engine.runner.model
    assert isinstance(model.ops, FusedLayerOps)
    fused = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    model.ops = TorchLayerOps(model.rope, model.cfg.rms_norm_eps)
    return fused, llm.generate(prompt_token_ids=prompts, sampling_params=params)


PROMPTS = [list(range(3, 3 + n)) for n in (1, 17, 40)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_float32_engine_gives_the_same_tokens_with_fused_and_torch_steps(kernels, tiny_model_dirs, arch):
    from services.engine import LLM, SamplingParams

    llm = LLM(model=str(tiny_model_dirs[arch]), dtype="float32", num_kv_blocks=256, block_size=16)
    fused, reference = run_both(llm, PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in fused] == [o.token_ids for o in reference]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_engine_first_token_distribution_matches(kernels, tiny_model_dirs, arch):
    """bf16 tokens of a random tiny model are not compared: its logits are nearly flat, so a rare
    last-bit difference flips argmax ties. The first token's top log-probabilities are compared instead."""
    from services.engine import LLM, SamplingParams

    llm = LLM(model=str(tiny_model_dirs[arch]), dtype="bfloat16", num_kv_blocks=256, block_size=16)
    fused, reference = run_both(llm, PROMPTS, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5))
    for f, r in zip(fused, reference):
        got = sorted(v for _, v in f.logprobs[0].top)
        want = sorted(v for _, v in r.logprobs[0].top)
        # bf16 logits of magnitude 4-8 are quantised in steps of 1/32-1/16: allow ~2 steps (a wrong
        # rotation, norm or gate moves these by whole units)
        assert got == pytest.approx(want, abs=0.15)


def test_bf16_vector_and_scalar_paths_agree(kernels):
    """Where the CPU has AVX512-BF16, bf16 rows run 16 lanes at a time with a scalar loop for the rest of
    the row. Rows whose tail repeats their first elements (inputs, weights, cos/sin) must give the tail the
    same bits as the head: the two paths round alike, on special values too (±inf, NaN, saturated, ±0)."""
    gen = torch.Generator().manual_seed(7)
    bf = torch.bfloat16

    def with_tail(head: torch.Tensor, width: int, tail: int) -> torch.Tensor:
        """Rows of `width` vector-path elements then `tail` scalar-path ones repeating the first `tail`."""
        return torch.cat([head[..., :width], head[..., :tail]], dim=-1).contiguous()

    # SiLU * up: F = 1536 + 15
    gate = torch.randn(3, 1536, generator=gen) * 6
    gate[0, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -100.0, 100.0, 0.0, -0.0, 1e-30])
    up = torch.randn(3, 1536, generator=gen)
    g, u = with_tail(gate, 1536, 15), with_tail(up, 1536, 15)
    out = kernels.silu_and_mul(torch.cat([g, u], dim=-1).to(bf))
    assert out.shape == (3, 1551)
    torch.testing.assert_close(out[:, 1536:], out[:, :15], rtol=0, atol=0, equal_nan=True)

    # residual add and RMSNorm: n = 576 + 9; the tail's squares join the row's sum, so compare the
    # normalised values, each rounded from (row value × the row's one inverse RMS)
    x, res, w = (with_tail(torch.randn(2, 576, generator=gen) * 3, 576, 9).to(bf) for _ in range(3))
    w = w[0].contiguous()
    res2 = res.clone()
    h = kernels.add_rms_norm_(x, res2, w, 1e-5)
    assert torch.equal(res2[:, 576:], res2[:, :9])
    assert torch.equal(h[:, 576:], h[:, :9])
    assert torch.equal(kernels.rms_norm(x, w, 1e-5)[:, 576:], kernels.rms_norm(x, w, 1e-5)[:, :9])

    # RoPE: head_dim 80 (half 40 = 32 in lanes + 8 scalar), tail of each half repeating its start
    rows, heads, half = 4, 3, 40
    first, second = torch.randn(rows, heads, 32, generator=gen), torch.randn(rows, heads, 32, generator=gen)
    q = torch.cat([with_tail(first, 32, 8), with_tail(second, 32, 8)], dim=-1).to(bf).contiguous()
    c1, c2, s1, s2 = (torch.randn(16, 32, generator=gen) for _ in range(4))
    cos = torch.cat([with_tail(c1, 32, 8), with_tail(c2, 32, 8)], dim=-1).to(bf).contiguous()
    sin = torch.cat([with_tail(s1, 32, 8), with_tail(s2, 32, 8)], dim=-1).to(bf).contiguous()
    kernels.rope_(q, heads, torch.randint(0, 16, (rows,), generator=gen), cos, sin)
    assert torch.equal(q[..., 32:half], q[..., :8]) and torch.equal(q[..., half + 32 :], q[..., half : half + 8])
