"""The small-batch linear CPU kernel (decode-step matmuls with few rows) against F.linear."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from services.engine.cpu_kernels import load_small_batch_linear
from services.engine.models.llama import Linear, onednn_packs, small_batch_max_rows
from tests.helpers.kernels import require_kernel


@pytest.fixture(scope="module")
def kernel():
    return require_kernel(load_small_batch_linear(), "the small-batch linear CPU kernel")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 5), (257, 576), (1000, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch(kernel, dtype, atol, m, n, k, with_bias):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    got, want = kernel(x, w, b), F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, atol=atol * max(1, k**0.5 / 8), rtol=0.02 if dtype == torch.bfloat16 else 1e-4)


def test_zero_rows(kernel):
    assert kernel(torch.empty(0, 4), torch.randn(3, 4)).shape == (0, 3)


@pytest.mark.parametrize(
    "x, w, b",
    [
        (torch.randn(2, 4), torch.randn(3, 5), None),  # K mismatch
        (torch.randn(2, 4), torch.randn(3, 4).to(torch.bfloat16), None),  # dtype mismatch
        (torch.randn(2, 4).double(), torch.randn(3, 4).double(), None),  # unsupported dtype
        (torch.randn(4, 2).t(), torch.randn(3, 4), None),  # non-contiguous x
        (torch.randn(2, 4), torch.randn(3, 4), torch.randn(2)),  # bias of the wrong length
        (torch.randn(4), torch.randn(3, 4), None),  # x not 2-D
    ],
)
def test_bad_input_raises(kernel, x, w, b):
    with pytest.raises(RuntimeError, match="small_batch_linear"):
        kernel(x, w, b)


@pytest.mark.parametrize("has_bf16_dot", [True, False])
def test_model_linear_dispatch(kernel, has_bf16_dot):
    calls = []

    def spy(x, w, b=None):
        calls.append(x.shape[0])
        return kernel(x, w, b)

    lin = Linear(spy, has_bf16_dot)
    w = torch.randn(16, 8)
    bf16_rows = small_batch_max_rows(torch.bfloat16, has_bf16_dot)
    assert bf16_rows == (4 if has_bf16_dot else 1) and small_batch_max_rows(torch.float32, has_bf16_dot) == 0
    lin(torch.randn(1, 8), w)  # fp32: torch's GEMV is the faster one now
    lin(torch.randn(bf16_rows, 8).to(torch.bfloat16), w.to(torch.bfloat16))  # few bf16 rows: kernel
    lin(torch.randn(bf16_rows + 1, 8).to(torch.bfloat16), w.to(torch.bfloat16))  # more: torch
    lin(torch.randn(1, 8).double(), w.double())  # other dtypes: torch
    assert calls == [bf16_rows]


def test_bf16_dot_path_matches_torch_at_awkward_widths(kernel):
    """K not a multiple of 32 (masked tail), M from 1 to 8, with a bias."""
    gen = torch.Generator().manual_seed(1)
    for m in range(1, 9):
        for k in (1, 31, 33, 70):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            w = torch.randn(37, k, generator=gen).to(torch.bfloat16)
            b = torch.randn(37, generator=gen).to(torch.bfloat16)
            want = F.linear(x.float(), w.float(), b.float())
            torch.testing.assert_close(kernel(x, w, b).float(), want, atol=0.05 * max(1, k**0.5 / 4), rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prepack_works_on_every_cpu(dtype):
    """prepack() never raises, and packs only where oneDNN runs the dtype: oneDNN's bf16 reorder raises
    on a CPU without AVX-512 or AVX-NE-CONVERT (a Zen 3), which once stopped every bf16 model loading."""
    gen = torch.Generator().manual_seed(8)
    w, b = torch.randn(96, 40, generator=gen).to(dtype), torch.randn(96, generator=gen).to(dtype)
    lin = Linear(None)
    lin.prepack(w)
    assert (id(w) in lin.packed) == onednn_packs(dtype)
    x = torch.randn(64, 40, generator=gen).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(lin(x, w, b).float(), F.linear(x.float(), w.float(), b.float()), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prepacked_weights_give_the_plain_result(dtype):
    """Prepacked (oneDNN) matmuls for every row count from the packed minimum on, torch's for fewer."""
    if not onednn_packs(dtype):
        pytest.skip(f"oneDNN does not run {dtype} matmuls on this CPU or torch")
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(96, 40, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    lin = Linear(None)
    lin.prepack(w)
    assert id(w) in lin.packed
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    for m in (1, 2, 3, 64, 300):
        x = torch.randn(m, 40, generator=gen).to(dtype)
        torch.testing.assert_close(lin(x, w, b).float(), F.linear(x.float(), w.float(), b.float()), **tol)
    lin.packed[id(w)] = "not a packed weight"  # consulted, it would fail
    if dtype == torch.float32:  # 1-2 fp32 rows stay on torch's GEMV (faster there)
        assert lin(torch.randn(2, 40).to(dtype), w).shape == (2, 96)
    with pytest.raises((TypeError, RuntimeError)):
        lin(torch.randn(3, 40).to(dtype), w)


def test_calibrate_routes_each_row_count_to_the_faster_path():
    """calibrate() times the kernel against torch's path on the given weights and keeps the kernel up
    to the first row count where torch wins: a kernel slower than torch gets no rows, one faster at
    every count gets all of them, one faster only at 1-2 rows gets 2."""
    weights = [torch.randn(2048, 1024) for _ in range(4)]  # 32 MB: torch's path takes ~1 ms or more

    def timed_kernel(delay_for_rows):
        def kernel(x, w, b=None):
            if delay_for_rows(x.shape[0]):
                time.sleep(delay_for_rows(x.shape[0]))
            return torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

        return kernel

    cases = {"slow": (lambda m: 0.05, 0), "fast": (lambda m: 0.0, 4), "fast at 1-2 rows": (lambda m: 0.0 if m <= 2 else 0.05, 2)}
    for what, (delay, want) in cases.items():
        lin = Linear(timed_kernel(delay))
        timings = lin.calibrate(weights, max_m=4, reps=2)
        assert lin.max_rows[torch.float32] == want, (what, timings)
        assert lin.max_rows[torch.bfloat16] == small_batch_max_rows(torch.bfloat16, False)  # other dtypes untouched
    assert Linear(None).calibrate(weights) == {}
