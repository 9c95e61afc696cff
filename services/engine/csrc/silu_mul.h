// silu(x) * u element by element, as the engine's SwiGLU computes it: shared by the separate op
// (fused_elementwise.cpp's silu_and_mul) and the panel matmul's gate/up epilogue (panel_linear.cpp's
// panel_swiglu), so that the two give the same bits. torch's numerics: silu is rounded to the model's dtype
// before the product (bf16: nearest even, a NaN kept). Compiled without fused multiply-adds (torch uses none
// here) whatever the including file's fp-contract. cpu_kernels.py hashes this header into every build.
#pragma once

#include <cstdint>

#include "bf16.h"

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

#include "exp_nonpos.h"

// x and u as the model stores them (bf16 models: values already rounded to bf16); kBf16: the model's dtype
template <bool kBf16>
inline float silu_times(float x, float u) {
  // torch: x / (1 + exp(-x)). With e = exp(-|x|), which never overflows: x / (1 + e) for x > 0, and
  // x e / (1 + e) for x <= 0 (x / (1 + 1/e) multiplied through by e): one division, not two
  // (the same bits on 12.6M bf16 inputs, ~10% faster at 64 and 8,192 rows)
  const float e = exp_nonpos(x > 0.f ? -x : x);
  float silu = (x > 0.f ? x : x * e) / (1.f + e);
  if constexpr (kBf16) silu = bf16_bits_to_float(float_to_bf16_bits_keep_nan(silu));
  return silu * u;
}

// out[i] = silu_times(g[i], u[i]), a loop the compiler vectorises (the product is left unrounded: the caller
// stores it in the model's dtype)
template <bool kBf16>
inline void silu_times_span(const float* __restrict g, const float* __restrict u, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = silu_times<kBf16>(g[i], u[i]);
}

#pragma GCC pop_options
