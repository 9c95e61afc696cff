"""The C++ CPU kernels in tests: a kernel that does not build is a failure on a machine with a C++
compiler (a compile error or a failed self-check must not hide behind a skip, where the engine would
silently fall back to the slower torch path), and a skip only where none can be built at all."""

from __future__ import annotations

import shutil

import pytest

from services.engine.cpu_kernels import kernels_disabled


def require_kernel(kernel, what: str):
    """`kernel` as a loader returned it (None: it did not build): returned, or the test fails/skips."""
    if kernel is not None:
        return kernel
    if kernels_disabled():
        pytest.skip(f"{what}: TANDEM_DISABLE_CPU_KERNELS is set")
    if shutil.which("c++") or shutil.which("g++"):
        pytest.fail(f"{what} did not build on a machine with a C++ compiler (see the logged warning)")
    pytest.skip(f"{what}: no C++ compiler here, the engine uses the torch path")
