"""The CPU's float32 multiply-add peak: the roof every fp32 matmul here runs under.

    python -m benchmarks.fma_peak                 # 1 and 2 threads

Twelve independent chains of vector multiply-adds a thread (more than the FMA units' latency x
throughput, so they never wait on each other), on the widest vectors the build has (-march=native, 512
bits where the CPU has AVX-512), nothing read from memory. Prints GFLOP/s (2 per multiply-add) for each
thread count, best of five runs of ~0.3 s. `benchmarks.engine_throughput`'s ceiling is torch's own
2,048² matmul, which on AMD CPUs runs below what the panel kernel reaches (168 against 205-214 GF/s on a
Zen 4); this is the roof itself.
"""

from __future__ import annotations

import argparse
import json

from torch.utils import cpp_extension

from services.engine.cpu_kernels import kernel_cache_root

_SOURCE = r"""
#include <omp.h>
#include <chrono>
#include <cstdint>

typedef float vec __attribute__((vector_size(64)));  // 16 floats: one zmm with AVX-512, two ymm with AVX2

// seconds for `reps` rounds of 12 independent multiply-adds on each of `threads` threads
double run_chains(int64_t reps, int threads) {
  const auto t0 = std::chrono::steady_clock::now();
  float sink = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    vec a[12];
    const float seed = 1e-9f * (omp_get_thread_num() + 1);
    for (int i = 0; i < 12; ++i) a[i] = vec{} + seed * (i + 1);
    const vec b = vec{} + 0.999999f, c = vec{} + 1e-9f;
    for (int64_t r = 0; r < reps; ++r) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) a[i] = a[i] * b + c;
    }
    for (int i = 0; i < 12; ++i)
      for (int l = 0; l < 16; ++l) sink += a[i][l];
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sink == 12345.f ? -s : s;  // keeps the chains live
}
"""


def load():
    build = kernel_cache_root() / "fma_peak"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load_inline(
        name="tandem_fma_peak",
        cpp_sources=_SOURCE + "\ndouble run_chains(int64_t reps, int threads);",
        functions=["run_chains"],
        extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=False,
    )


def gflops(module, threads: int, reps: int = 20_000_000, runs: int = 5) -> float:
    """Best of `runs`: 12 chains x 16 lanes x 2 FLOPs x reps, a thread."""
    best = min(abs(module.run_chains(reps, threads)) for _ in range(runs))
    return 12 * 16 * 2 * reps * threads / best / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    module = load()
    print(json.dumps({"benchmark": "fma_peak", "fp32_GFLOPs": {str(t): round(gflops(module, t), 1) for t in args.threads}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
