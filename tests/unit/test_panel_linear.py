"""The panel matmul (csrc/panel_linear.cpp), fp32 and bf16, against F.linear, its input checks, and
Linear's routing.

Fails when the kernel does not build on a machine with a compiler; skipped without one, with
TANDEM_DISABLE_CPU_KERNELS=1, or on a CPU with neither AVX2 nor AVX-512 (where fp32 weights stay packed for
oneDNN).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from services.engine.cpu_kernels import load_panel_linear_module
from services.engine.models import llama
from services.engine.models.llama import Linear, onednn_packs
from tests.helpers.kernels import require_kernel


@pytest.fixture(scope="module")
def module():
    m = require_kernel(load_panel_linear_module(), "the fp32 panel matmul CPU kernel")
    if not m.available:
        pytest.skip("this CPU has neither AVX2 nor AVX-512: fp32 matmuls stay on oneDNN")
    return m


# (rows, weight rows, K): single rows, a register tile (12 rows on one panel and 6 on two with AVX-512,
# 6 with AVX2) and one past it, both sides of the row count from which AVX-512 pairs panels (19 and 20
# rows), a decode batch, and with K = 1,536 (336 rows a block) prefills that span three row blocks, the
# last of 28 rows (panels paired) or of 10 (one-panel tiles after paired blocks); weight rows that are not
# whole panels (70: the last panel 6 wide, 16: less than one AVX-512 vector, 20: one AVX2 panel and 4);
# and a K of 3 under many row tiles, whose shares of the next panel's prefetch are mostly empty
SHAPES = [(1, 70, 40), (6, 20, 40), (7, 20, 40), (12, 96, 40), (13, 16, 40), (19, 96, 40), (20, 96, 40), (64, 576, 576),
          (700, 70, 1536), (682, 96, 1536), (5, 960, 1536), (50, 70, 3)]  # fmt: skip


@pytest.mark.parametrize(("m", "n", "k"), SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_f_linear(module, m, n, k, bias, dtype):
    gen = torch.Generator().manual_seed(m * 7 + n)
    x, w = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    panels = module.pack_panels(w)
    width = module.panel_width  # two float vectors: 32 columns with AVX-512, 16 with AVX2
    assert panels.shape == (-(-n // width), k, width) and panels.dtype == dtype
    got = module.panel_linear(x, panels, n, b)
    assert got.shape == (m, n) and got.dtype == dtype
    # float32 products and sums (exact bf16 inputs); only the order of the K sums differs from the
    # float32 reference, and bf16 outputs are rounded once, to nearest even
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4 * k**0.5, rtol=1e-5)
    else:
        torch.testing.assert_close(got, want.bfloat16(), atol=1e-3 * k**0.5, rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [2048, 2047], ids=["whole-lines", "ragged-rows"])
def test_outputs_past_the_streaming_size_match(module, dtype, n):
    """Outputs of 16 MB or more whose rows are whole 64-byte lines are written with non-temporal stores
    (and a fence); rows that are not whole lines keep plain stores. Both must give F.linear's values."""
    m = (16 << 20) // (2048 * torch.tensor([], dtype=dtype).element_size())  # 2,048 fp32 or 4,096 bf16 rows
    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(m, 64, generator=gen).to(dtype), torch.randn(n, 64, generator=gen).to(dtype)
    got = module.panel_linear(x, module.pack_panels(w), n)
    want = F.linear(x.float(), w.float())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
    else:
        torch.testing.assert_close(got, want.bfloat16(), atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [60, 200, 224], ids=["2-panels-ragged", "7-panels-ragged", "7-panels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_thread_counts_agree(module, threads, n, dtype):
    """Each thread takes its panels two at a time (AVX-512) and a last odd one alone, so the thread count
    decides which panels pair up: a pair whose second panel is ragged (60 on one thread), pairs and a
    ragged single (200), pairs and a whole single (224)."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(50, 64, generator=gen).to(dtype), torch.randn(n, 64, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    panels = module.pack_panels(w)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = module.panel_linear(x, panels, n, b)
    finally:
        torch.set_num_threads(old)
    want = F.linear(x.float(), w.float(), b.float())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    else:
        torch.testing.assert_close(got, want.bfloat16(), atol=1e-2, rtol=8e-3)


def test_zero_rows(module):
    w = torch.randn(40, 8)
    assert module.panel_linear(torch.empty(0, 8), module.pack_panels(w), 40).shape == (0, 40)


def test_bad_input_raises(module):
    w = torch.randn(70, 40)
    panels = module.pack_panels(w)
    x = torch.randn(4, 40)
    bad_calls = {
        "bf16 x": (x.bfloat16(), panels, 70, None),
        "non-contiguous x": (torch.randn(40, 4).t(), panels, 70, None),
        "K mismatch": (torch.randn(4, 41), panels, 70, None),
        "N past the panels": (x, panels, 97, None),
        "N a panel short": (x, panels, 64, None),
        "bias of the wrong size": (x, panels, 70, torch.randn(69)),
        "bf16 bias": (x, panels, 70, torch.randn(70).bfloat16()),
        "panels not from pack_panels": (x, torch.randn(3, 40, 16), 70, None),
    }
    bad_calls["fp32 x, bf16 panels"] = (x, module.pack_panels(w.bfloat16()), 70, None)
    # where bf16 panels hold k pairs, K = 40 and an x of 39 columns fill the same 20 pairs
    bad_calls["bf16 x a column short"] = (torch.randn(4, 39).bfloat16(), module.pack_panels(w.bfloat16()), 70, None)
    bad_calls["sliced panels"] = (x, module.pack_panels(torch.randn(70, 41))[:, :40], 70, None)
    for what, args in bad_calls.items():
        with pytest.raises(RuntimeError, match="panel_linear"):
            module.panel_linear(*args)
            pytest.fail(f"no error for {what}")
    for bad_w in (w.half(), w.int(), w[0]):
        with pytest.raises(RuntimeError, match="panel_linear"):
            module.pack_panels(bad_w)


@pytest.mark.parametrize("amx_bf16", [False, True], ids=["no-amx", "amx"])
def test_linear_packs_into_panels_and_routes_them(module, monkeypatch, amx_bf16):
    """With the panel kernel, an fp32 weight gets panels instead of a oneDNN copy, and matmuls of 3
    rows or more run on them (1-2 rows keep torch's GEMV, as with oneDNN); bf16 gets panels too, for
    every row count, unless the CPU has AMX, where it stays with oneDNN. oneDNN is made to accept bf16
    here (as it does on any AVX-512 CPU): bf16 weights once went to oneDNN wherever it accepted them,
    and on an Ice Lake, which has no native bf16, its emulated matmul made a bf16 decode step 2.2x
    slower than on the panels."""
    calls = []

    class Spy:
        available = True
        bf16_dot = module.bf16_dot
        pack_panels = staticmethod(module.pack_panels)

        @staticmethod
        def panel_linear(x, panels, n, b=None):
            calls.append(x.shape[0])
            return module.panel_linear(x, panels, n, b)

    Spy.amx_bf16 = amx_bf16
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    lin = Linear(None, panel_module=Spy())
    lin.prepack(w)
    assert id(w) in lin.panels and id(w) not in lin.packed
    for m in (1, 2, 3, 64):
        x = torch.randn(m, 40, generator=gen)
        torch.testing.assert_close(lin(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    assert calls == [3, 64]
    wb, bb = w.bfloat16(), b.bfloat16()
    if amx_bf16:
        if not onednn_packs(torch.bfloat16):
            pytest.skip("oneDNN does not run bf16 matmuls on this CPU: the AMX case cannot be packed here")
        lin.prepack(wb)
        assert id(wb) in lin.packed and id(wb) not in lin.panels
        return
    monkeypatch.setattr(llama, "onednn_packs", lambda dtype: True)
    lin.prepack(wb)
    assert id(wb) in lin.panels and id(wb) not in lin.packed
    calls.clear()
    for m in (1, 2, 64):
        x = torch.randn(m, 40, generator=gen).bfloat16()
        want = F.linear(x.float(), wb.float(), bb.float())
        torch.testing.assert_close(lin(x, wb, bb).float(), want, atol=0.05, rtol=0.01)
    assert calls == [1, 2, 64]
    unavailable = type("NoPanels", (), {"available": False})()
    plain = Linear(None, panel_module=unavailable)
    plain.prepack(w)
    assert not plain.panels and (id(w) in plain.packed) == torch.backends.mkldnn.is_available()


def test_calibrate_panels_takes_few_rows_only_where_the_panels_are_faster(module):
    """calibrate() times the panels against torch's GEMV at the row counts below PANEL_MIN_ROWS and
    moves the panels' minimum down to the fewest rows where they win: never for panels slower than
    the GEMV, 1 for faster ones, 2 for ones faster only at 2 rows."""
    weights = [torch.randn(2048, 1024) for _ in range(4)]  # 32 MB: the GEMV takes ~1 ms or more

    def delayed(delay_for_rows):
        class Timed:
            available = True
            pack_panels = staticmethod(module.pack_panels)

            @staticmethod
            def panel_linear(x, panels, n, b=None):
                time.sleep(delay_for_rows(x.shape[0]))
                return torch.empty(x.shape[0], n)

        return Timed()

    cases = {"slow": (lambda m: 0.05, 3), "fast": (lambda m: 0.0, 1), "fast at 2 rows only": (lambda m: 0.0 if m == 2 else 0.05, 2)}
    for what, (delay, want) in cases.items():
        lin = Linear(None, panel_module=delayed(delay))
        for w in weights:
            lin.prepack(w)
        timings = lin.calibrate(weights, reps=2)
        assert lin.panel_min_rows[torch.float32] == want, (what, timings)
        assert lin.panel_min_rows[torch.bfloat16] == Linear.PANEL_MIN_ROWS[torch.bfloat16]  # other dtypes untouched
    assert Linear(None).calibrate_panels(weights) == {}  # no panels: nothing timed


def test_large_row_matmuls_leave_slower_panels_for_f_linear(module):
    """calibrate_large_rows() sends fp32 matmuls from the fewest of LARGE_ROWS where F.linear beats the
    panels to F.linear, and __call__ follows it: panels slower at every large row count give way from
    512 rows, panels slower only at 2,048 rows from 2,048, faster panels keep every row count. bf16
    weights are never timed (their F.linear is no fast path)."""
    gen = torch.Generator().manual_seed(11)
    weights = [torch.randn(256, 128, generator=gen) for _ in range(4)]
    calls = []
    calibrating = True

    def delayed(delay_for_rows):
        class Timed:
            available = True
            amx_bf16 = False
            pack_panels = staticmethod(module.pack_panels)

            @staticmethod
            def panel_linear(x, panels, n, b=None):
                if calibrating:  # timed: the delay alone, so that "faster" is faster than any F.linear
                    time.sleep(delay_for_rows(x.shape[0]))
                    return torch.empty(x.shape[0], n)
                calls.append(x.shape[0])
                return module.panel_linear(x, panels, n, b)

        return Timed()

    slow = 0.02  # a matmul of these shapes takes F.linear well under 2 ms at 2,048 rows
    cases = {
        "slower everywhere": (lambda m: slow, 512),
        "slower at 2,048 rows only": (lambda m: slow if m >= 2048 else 0.0, 2048),
        "faster everywhere": (lambda m: 0.0, None),
    }
    for what, (delay, want) in cases.items():
        lin = Linear(None, panel_module=delayed(delay))
        for w in weights:
            lin.prepack(w)
        calibrating = True
        timings = lin.calibrate_large_rows(weights)
        assert lin.panel_max_rows.get(torch.float32) == want, (what, timings)
        calibrating = False
        calls.clear()
        for m in (64, 511, 512, 2048):
            x = torch.randn(m, 128, generator=gen)
            torch.testing.assert_close(lin(x, weights[0]), F.linear(x, weights[0]), atol=1e-4, rtol=1e-4)
        assert calls == [m for m in (64, 511, 512, 2048) if want is None or m < want], what
    bf16 = [w.bfloat16() for w in weights]
    calibrating = True
    lin = Linear(None, panel_module=delayed(lambda m: slow))
    for w in bf16:
        lin.prepack(w)
    assert lin.calibrate_large_rows(bf16) == {} and not lin.panel_max_rows


# -- the fused bf16 SwiGLU matmul (panel_swiglu) ------------------------------------------------------

# (rows, intermediate I, K): every two-panel tile height (1-6 rows) and past it, a decode batch, a prefill
# chunk over two row blocks; I not whole panels (35: the last pair 3 wide; 70), an odd K (k pairs padded)
SWIGLU_SHAPES = [(1, 70, 40), (5, 35, 41), (6, 64, 64), (7, 70, 40), (19, 96, 40), (64, 1536, 576), (1200, 70, 1025)]


@pytest.fixture(scope="module")
def swiglu_module(module):
    if not module.swiglu:
        pytest.skip("the fused SwiGLU matmul needs AVX512-BF16's dot instruction (without it, the matmul and silu_and_mul stay separate)")
    return module


@pytest.mark.parametrize(("m", "i", "k"), SWIGLU_SHAPES, ids=[f"{m}x{i}x{k}" for m, i, k in SWIGLU_SHAPES])
def test_panel_swiglu_is_the_separate_matmul_and_silu_and_mul_bit_for_bit(swiglu_module, m, i, k):
    """The epilogue rounds the gate's and up projection's sums to bf16 as the separate matmul stores them
    and runs silu_mul.h's arithmetic, as silu_and_mul does: the same bits, not just close ones."""
    from services.engine.cpu_kernels import load_fused_elementwise

    fused_ops = require_kernel(load_fused_elementwise(), "the fused layer steps CPU kernel")
    gen = torch.Generator().manual_seed(m + i + k)
    w = (torch.randn(2 * i, k, generator=gen) * 0.2).bfloat16()
    x = (torch.randn(m, k, generator=gen) * 2).bfloat16()
    panels = swiglu_module.pack_swiglu_panels(w)
    width = swiglu_module.panel_width
    assert panels.shape == (2 * -(-i // width), k, width)
    got = swiglu_module.panel_swiglu(x, panels, i)
    assert got.shape == (m, i) and got.dtype == torch.bfloat16
    assert torch.equal(got, fused_ops.silu_and_mul(swiglu_module.panel_linear(x, swiglu_module.pack_panels(w), 2 * i)))
    gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, atol=2e-2 * k**0.5, rtol=2e-2)


def test_panel_swiglu_refuses_what_it_cannot_run(swiglu_module):
    w = torch.randn(70, 40).bfloat16()
    panels, x = swiglu_module.pack_swiglu_panels(w), torch.randn(4, 40).bfloat16()
    assert swiglu_module.panel_swiglu(torch.empty(0, 40).bfloat16(), panels, 35).shape == (0, 35)
    bad_calls = {
        "fp32 x": (x.float(), panels, 35),
        "plain panels": (x, swiglu_module.pack_panels(w), 35),  # one panel per 32 rows: I does not fit
        "I not half the rows": (x, panels, 70),
        "x a column short": (torch.randn(4, 39).bfloat16(), panels, 35),
        "sliced panels": (x, panels[:, :20], 35),
    }
    for what, args in bad_calls.items():
        with pytest.raises(RuntimeError, match="panel_linear: "):
            swiglu_module.panel_swiglu(*args)
            pytest.fail(f"{what} was accepted")
    with pytest.raises(RuntimeError, match="halves"):
        swiglu_module.pack_swiglu_panels(torch.randn(71, 40).bfloat16())


def test_linear_fuses_bf16_gate_up_at_the_panels_rows_only(swiglu_module):
    """prepack_gate_up packs bf16 [gate; up] weights for panel_swiglu (and keeps no plain panels for
    them); gate_up_silu runs it where a matmul would run on panels, and the small-batch kernel's rows,
    fp32 weights and fuse=False keep the matmul and the separate silu_and_mul."""
    from services.engine.cpu_kernels import load_fused_elementwise

    fused_ops = require_kernel(load_fused_elementwise(), "the fused layer steps CPU kernel")
    fused: list[int] = []
    separate: list[int] = []

    class Spy:
        available, bf16_dot, amx_bf16, swiglu = True, True, False, True
        pack_panels = staticmethod(swiglu_module.pack_panels)
        pack_swiglu_panels = staticmethod(swiglu_module.pack_swiglu_panels)
        panel_linear = staticmethod(swiglu_module.panel_linear)

        @staticmethod
        def panel_swiglu(x, panels, i):
            fused.append(x.shape[0])
            return swiglu_module.panel_swiglu(x, panels, i)

    def silu_and_mul(gate_up):
        separate.append(gate_up.shape[0])
        return fused_ops.silu_and_mul(gate_up)

    gen = torch.Generator().manual_seed(9)
    w = torch.randn(140, 40, generator=gen).bfloat16()
    kernel_rows = []

    def small_batch(x, weight, b):
        kernel_rows.append(x.shape[0])
        return F.linear(x, weight, b)

    lin = Linear(small_batch, panel_module=Spy())
    lin.max_rows[torch.bfloat16] = 1  # one row to the small-batch kernel
    lin.prepack_gate_up(w, fuse=True)
    assert id(w) in lin.swiglu_panels and id(w) not in lin.panels
    for m in (1, 2, 64):
        x = torch.randn(m, 40, generator=gen).bfloat16()
        gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
        torch.testing.assert_close(lin.gate_up_silu(x, w, silu_and_mul).float(), F.silu(gate) * up, atol=0.1, rtol=0.05)
    assert fused == [2, 64] and separate == [1] and kernel_rows == [1]
    for weight, fuse in ((torch.randn(140, 40, generator=gen), True), (w.clone(), False)):  # fp32; fusing off
        lin.prepack_gate_up(weight, fuse=fuse)
        assert id(weight) not in lin.swiglu_panels and id(weight) in lin.panels
