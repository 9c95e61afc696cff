"""The compiled greedy argmax against torch.max(dim=-1).indices: the first maximum, NaN greatest."""

from __future__ import annotations

import pytest
import torch

from services.engine import sampler
from services.engine.cpu_kernels import load_greedy_argmax
from tests.helpers.kernels import require_kernel


@pytest.fixture(scope="module")
def argmax():
    return require_kernel(load_greedy_argmax(), "the greedy argmax CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 33, 1000, 49152])
def test_matches_torch_max(argmax, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=gen).to(dtype)
    logits[1] = 0.5  # every element tied: index 0
    logits[2] = float("-inf")
    if vocab > 3:
        logits[3, vocab // 3] = logits[3, vocab - 1] = 1e4  # a tie across lanes and the tail: the first
        logits[4, vocab - 1] = float("inf")
        logits[5, vocab // 2] = float("nan")  # NaN wins over everything, even +inf
        logits[5, 0] = float("inf")
        logits[6, vocab - 1] = float("nan")  # in the tail
        logits[7, [vocab // 2, vocab - 2]] = float("nan")  # the first NaN
    logits[8, 0] = float("nan")
    assert torch.equal(argmax(logits), logits.max(dim=-1).indices)


def test_bf16_ties_that_only_bf16_makes(argmax):
    """Values that differ in float32 but round to the same bf16: the first of them, as torch on the bf16 rows."""
    row = torch.full((1, 4096), -3.0)
    row[0, 100], row[0, 3000] = 7.001, 7.0
    logits = row.bfloat16()
    assert logits[0, 100] == logits[0, 3000]
    assert argmax(logits).tolist() == [100] == logits.max(dim=-1).indices.tolist()


def test_rows_of_a_wider_tensor(argmax):
    """Row stride larger than the vocab (the greedy rows picked out of a batch's logits by a view)."""
    wide = torch.randn(6, 300)
    view = wide[:, :250]
    assert view.stride(0) == 300
    assert torch.equal(argmax(view), view.max(dim=-1).indices)


def test_bad_input_raises(argmax):
    for what, bad in {"int": torch.zeros(2, 5, dtype=torch.long), "1-d": torch.zeros(5), "strided vocab": torch.zeros(2, 10)[:, ::2],
                      "float16": torch.zeros(2, 5, dtype=torch.float16), "empty vocab": torch.zeros(2, 0)}.items():  # fmt: skip
        with pytest.raises(RuntimeError, match="argmax_rows"):
            argmax(bad)
            pytest.fail(f"no error for {what}")


def test_sampler_uses_it_and_agrees(argmax, monkeypatch):
    """sample()'s greedy rows go through the kernel on CPU logits, and give torch's tokens."""
    from services.engine.request import Request
    from services.engine.sampling_params import SamplingParams

    logits = torch.randn(4, 5000).bfloat16()
    requests = [Request(f"r{i}", [1, 2], SamplingParams(max_tokens=2, temperature=0), 0.0) for i in range(4)]
    calls = []
    monkeypatch.setattr(sampler, "load_greedy_argmax", lambda: lambda x: calls.append(x.shape) or argmax(x))
    tokens, _ = sampler.sample(logits, requests)
    assert calls == [(4, 5000)]
    assert tokens == logits.max(dim=-1).indices.tolist()
