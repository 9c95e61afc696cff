// y = x · Wᵀ (+ bias) for a few rows of x: the decode-step matmul when few sequences are running.
//
//   x     [M, K]  float32 or bfloat16, contiguous, M small (the caller uses it for M <= 8)
//   w     [N, K]  same dtype, contiguous (a Hugging Face Linear weight)
//   bias  [N]     optional, same dtype
//   returns [M, N] in x's dtype
//
// Why: with M = 1..8 the step is a matrix-vector product bound by reading W once. torch's CPU GEMV
// reads W at ~16 GB/s whatever the thread count (it does not split the work), and its M = 4 path is
// slower than four M = 1 calls; this machine reads memory at ~47 GB/s on two threads. Here the output
// rows are split across threads with at::parallel_for; each thread streams its slice of W once, and for
// every W row computes all M dot products while the row is in L1. Accumulation is float32.
//
// Built by services/engine/cpu_kernels.py (-O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fopenmp).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

#define NOINLINE __attribute__((noinline))


NOINLINE void to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
}

NOINLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#if defined(__AVX512BF16__)
// bf16 with AVX512-BF16: vdpbf16ps multiplies bf16 pairs exactly and accumulates in float32, 32 elements an
// instruction, straight from W and x. The generic path widened every W row to float32 first, which made it
// compute-bound at ~11 GB/s of weights (a batch-1 bf16 decode step took 3x the time to read the weights once).
// M accumulators stay in registers while one W row streams past; the last partial chunk of a row is a masked
// load (masked lanes read as zero and add nothing).
template <int M>
NOINLINE void bf16_dot_rows(const uint16_t* __restrict x, int64_t K, const uint16_t* __restrict w,
                            const uint16_t* __restrict bias, uint16_t* __restrict out, int64_t N, int64_t n0,
                            int64_t n1) {
  const int64_t full = K / 32 * 32;
  const __mmask32 tail_mask = static_cast<__mmask32>((1ull << (K - full)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
    }
    if (full < K) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, wr + full);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, x + m * K + full), wv);
    }
    const float b = bias ? bf16_bits_to_float(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) out[m * N + n] = float_to_bf16_bits(_mm512_reduce_add_ps(acc[m]) + b);
  }
}

template <int M>
void run_bf16_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out) {
  const int64_t K = x.size(1), N = w.size(0);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* bp = bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) { bf16_dot_rows<M>(xp, K, wp, bp, op, N, begin, end); });
}

// true when the bf16 dot-product path took the call
bool run_bf16_fast(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out) {
  switch (x.size(0)) {
    case 1: run_bf16_dot<1>(x, w, bias, out); return true;
    case 2: run_bf16_dot<2>(x, w, bias, out); return true;
    case 3: run_bf16_dot<3>(x, w, bias, out); return true;
    case 4: run_bf16_dot<4>(x, w, bias, out); return true;
    case 5: run_bf16_dot<5>(x, w, bias, out); return true;
    case 6: run_bf16_dot<6>(x, w, bias, out); return true;
    case 7: run_bf16_dot<7>(x, w, bias, out); return true;
    case 8: run_bf16_dot<8>(x, w, bias, out); return true;
    default: return false;
  }
}
#else
bool run_bf16_fast(const at::Tensor&, const at::Tensor&, const at::Tensor*, at::Tensor&) { return false; }
#endif

template <typename scalar_t>
void run(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  constexpr bool is_bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  // x as float32 once (it is tiny)
  std::vector<float> xf(M * K);
  if constexpr (is_bf16) {
    to_float(reinterpret_cast<const uint16_t*>(x.data_ptr<scalar_t>()), xf.data(), M * K);
  } else {
    std::memcpy(xf.data(), x.data_ptr<float>(), M * K * sizeof(float));
  }
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();

  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(is_bf16 ? K : 0);
    for (int64_t n = begin; n < end; ++n) {
      const float* wrow;
      if constexpr (is_bf16) {
        to_float(reinterpret_cast<const uint16_t*>(wp + n * K), row.data(), K);
        wrow = row.data();
      } else {
        wrow = wp + n * K;
      }
      const float b = bp ? static_cast<float>(bp[n]) : 0.f;
      for (int64_t m = 0; m < M; ++m) {
        const float y = dot(xf.data() + m * K, wrow, K) + b;
        if constexpr (is_bf16) {
          reinterpret_cast<uint16_t*>(op)[m * N + n] = float_to_bf16_bits(y);
        } else {
          op[m * N + n] = y;
        }
      }
    }
  });
}

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_batch_linear: tensors must be on CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_batch_linear: x must be [M, K] and w [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), "small_batch_linear: x has K=", x.size(1), " but w has K=", w.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_batch_linear: x and w must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "small_batch_linear: only float32 and bfloat16 are supported");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_batch_linear: x and w must be contiguous");
  const at::Tensor* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == w.scalar_type() &&
                    bias->is_contiguous(),
                "small_batch_linear: bias must be a contiguous [N] tensor of w's dtype");
    b = &bias.value();
  }
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  pybind11::gil_scoped_release no_gil;
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, w, b, out);
  } else {
    if (!run_bf16_fast(x, w, b, out)) run<at::BFloat16>(x, w, b, out);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_batch_linear", &small_batch_linear, "y = x W^T (+ bias) for a few rows of x",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
#if defined(__AVX512BF16__)
  m.attr("has_bf16_dot") = true;
#else
  m.attr("has_bf16_dot") = false;
#endif
}
