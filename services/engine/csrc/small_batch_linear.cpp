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
// Built by services/engine/cpu_kernels.py (-O3 -march=native -ffp-contract=fast -fopenmp).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#define NOINLINE __attribute__((noinline))

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint16_t float_to_bf16_bits(float f) {
  // round to nearest even, as torch does (NaN is not expected in activations here)
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

NOINLINE void to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(static_cast<uint32_t>(src[i]) << 16);
}

NOINLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

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
    run<at::BFloat16>(x, w, b, out);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_batch_linear", &small_batch_linear, "y = x W^T (+ bias) for a few rows of x",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
}
