// The decoder layer's elementwise steps, fused: each is one pass over its rows instead of 3-14 torch ops.
//
//   add_rms_norm_(x, residual, weight, eps) -> out       residual += x (in place), out = rms_norm(residual)
//   rms_norm(x, weight, eps) -> out                       out = rms_norm(x)
//   rope_(x, num_heads, positions, cos, sin)              rotary embedding of x[:, :num_heads] in place
//   silu_and_mul(gate_up) -> out                          silu(gate_up[:, :F]) * gate_up[:, F:]
//
// x, residual, out, gate_up: [T, ...] float32 or bfloat16 with stride 1 in the last dim; weight [hidden]
// of the same dtype; positions [T] int64; cos/sin [max_positions, head_dim] of x's dtype.
//
// Why: at 64 running sequences a bf16 decode step ran ~1,000 small torch ops, each a pass over a few
// hundred KB plus its dispatch and OpenMP fork/join; the norms, RoPE and SwiGLU made up most of them.
//
// Numerics are torch's, rounding for rounding (the model matches transformers token for token): every
// intermediate torch rounds to the model dtype is rounded here at the same point (residual + x in the
// dtype; RMSNorm in float32, normalised row rounded to the dtype, then times the weight, rounded; RoPE's
// two products rounded, then their sum; silu rounded before the product). fp-contract is off in this file
// so float32 products are not fused into FMAs that torch does not use. Two sums differ only in
// association: the RMSNorm sum of squares (lane-wise partial sums, as torch's vectorised reduction also
// does) and silu's exp (a polynomial within ~2 ulp of torch's), so float32 results agree to ~1e-7.
//
// Built by services/engine/cpu_kernels.py (-O3 -march=native -mprefer-vector-width=512 -fopenmp; -ffp-contract=fast is overridden
// by the pragma below).

#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>

#include "exp_nonpos.h"
#include <type_traits>

namespace {

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  return bits_to_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}

// round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN)
inline uint16_t to_bf16_bits(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// v rounded to T and back: what torch stores for an intermediate of dtype T
inline float round_to(float v, float*) { return v; }
inline float round_to(float v, at::BFloat16*) { return bits_to_float(static_cast<uint32_t>(to_bf16_bits(v)) << 16); }

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(at::BFloat16* p, int64_t i, float v) { reinterpret_cast<uint16_t*>(p)[i] = to_bf16_bits(v); }

// rows per parallel chunk: about 16K elements, so a single-token decode step stays on one thread
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

template <typename T>
void norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t n, int64_t x_stride,
               int64_t r_stride, float eps) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* xr = x + t * x_stride;
      T* rr = residual ? residual + t * r_stride : nullptr;
      T* orow = out + t * n;
      float sum = 0.f;
      if (rr) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          const float h = round_to(load(rr, i) + load(xr, i), static_cast<T*>(nullptr));
          store(rr, i, h);
          sum += h * h;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          const float h = load(xr, i);
          sum += h * h;
        }
      }
      const T* src = rr ? rr : xr;
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float h = round_to(load(src, i) * inv, static_cast<T*>(nullptr));
        store(orow, i, load(weight, i) * h);
      }
    }
  });
}

template <typename T>
void rope_rows(T* x, int64_t rows, int64_t heads, int64_t D, int64_t s_tok, int64_t s_head, const int64_t* pos,
               const T* cos, const T* sin, int64_t cs_stride) {
  const int64_t half = D / 2;
  at::parallel_for(0, rows, grain_rows(heads * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + pos[t] * cs_stride;
      const T* s = sin + pos[t] * cs_stride;
      for (int64_t h = 0; h < heads; ++h) {
        T* r = x + t * s_tok + h * s_head;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(r, i), x2 = load(r, i + half);
          // torch: x * cos + cat(-x2, x1) * sin, each product rounded to the dtype, then the sum
          const float a1 = round_to(x1 * load(c, i), static_cast<T*>(nullptr));
          const float b1 = round_to(-x2 * load(s, i), static_cast<T*>(nullptr));
          const float a2 = round_to(x2 * load(c, i + half), static_cast<T*>(nullptr));
          const float b2 = round_to(x1 * load(s, i + half), static_cast<T*>(nullptr));
          store(r, i, a1 + b1);
          store(r, i + half, a2 + b2);
        }
      }
    }
  });
}

// exp_nonpos(x) for x <= 0: exp_nonpos.h

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t F, int64_t stride) {
  at::parallel_for(0, rows, grain_rows(2 * F), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gu + t * stride;
      const T* u = g + F;
      T* o = out + t * F;
#pragma omp simd
      for (int64_t i = 0; i < F; ++i) {
        const float x = load(g, i);
        // torch: x / (1 + exp(-x)). With e = exp(-|x|), which never overflows: x / (1 + e) for x > 0, and
        // x e / (1 + e) for x <= 0 (x / (1 + 1/e) multiplied through by e): one division, not two
        // (the same bits on 12.6M bf16 inputs, ~10% faster at 64 and 8,192 rows)
        const float e = exp_nonpos(x > 0.f ? -x : x);
        const float silu = round_to((x > 0.f ? x : x * e) / (1.f + e), static_cast<T*>(nullptr));
        store(o, i, silu * load(u, i));
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, " must be float32 or bfloat16");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, what, " must be [rows, n] with stride 1 in its last dim, got ",
              t.sizes(), " strides ", t.strides());
}

#define DISPATCH(dtype, ...)                 \
  if ((dtype) == at::kFloat) {               \
    using T = float;                         \
    __VA_ARGS__();                           \
  } else {                                   \
    using T = at::BFloat16;                  \
    __VA_ARGS__();                           \
  }

at::Tensor norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [", n, "] tensor of x's dtype");
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x's shape and dtype");
  }
  at::Tensor out = at::empty({rows, n}, x.options());
  pybind11::gil_scoped_release no_gil;
  DISPATCH(x.scalar_type(), [&] {
    T* r = residual.has_value() ? residual->data_ptr<T>() : nullptr;
    norm_rows<T>(x.data_ptr<T>(), r, weight.data_ptr<T>(), out.data_ptr<T>(), rows, n, x.stride(0),
                 residual.has_value() ? residual->stride(0) : 0, static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps) {
  return norm_impl(x, residual, weight, eps);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return norm_impl(x, c10::nullopt, weight, eps); }

void rope_(at::Tensor x, int64_t num_heads, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1, "x must be a CPU [T, heads, head_dim] tensor with stride 1 in head_dim");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t T_ = x.size(0), D = x.size(2);
  TORCH_CHECK(num_heads >= 0 && num_heads <= x.size(1), "num_heads ", num_heads, " outside [0, ", x.size(1), "]");
  TORCH_CHECK(D % 2 == 0, "head_dim must be even, got ", D);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == T_ && positions.is_contiguous(),
              "positions must be a contiguous int64 [", T_, "] tensor");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(1) == D && cos.stride(1) == 1 && sin.stride(0) == cos.stride(0) &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos and sin must be [max_positions, ", D, "] tables of x's dtype");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "positions[", t, "] = ", pos[t], " outside the RoPE table's ", cos.size(0), " rows");
  pybind11::gil_scoped_release no_gil;
  DISPATCH(x.scalar_type(), [&] {
    rope_rows<T>(x.data_ptr<T>(), T_, num_heads, D, x.stride(0), x.stride(1), pos, cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0));
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up's last dim must be even (gate, up), got ", gate_up.size(1));
  const int64_t rows = gate_up.size(0), F = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, F}, gate_up.options());
  pybind11::gil_scoped_release no_gil;
  DISPATCH(gate_up.scalar_type(), [&] { silu_mul_rows<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), rows, F, gate_up.stride(0)); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x in place; returns rms_norm(residual) * weight",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rms_norm", &rms_norm, "rms_norm(x) * weight", pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rope_", &rope_, "rotary embedding of x[:, :num_heads] in place (rotate-half layout)", pybind11::arg("x"),
        pybind11::arg("num_heads"), pybind11::arg("positions"), pybind11::arg("cos"), pybind11::arg("sin"));
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up for gate_up = [gate | up]", pybind11::arg("gate_up"));
}
