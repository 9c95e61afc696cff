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
#include "bf16.h"
#include "silu_mul.h"
#include <type_traits>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) { return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]); }

// v rounded to T and back: what torch stores for an intermediate of dtype T
inline float round_to(float v, float*) { return v; }
inline float round_to(float v, at::BFloat16*) { return bf16_bits_to_float(float_to_bf16_bits_keep_nan(v)); }

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(at::BFloat16* p, int64_t i, float v) { reinterpret_cast<uint16_t*>(p)[i] = float_to_bf16_bits_keep_nan(v); }

#if defined(__AVX512BF16__)
// bf16 in 16 lanes. The compiler vectorises the scalar loops below, but not their float -> bf16 rounding
// (float_to_bf16_bits_keep_nan: ~7 integer ops a lane); VCVTNEPS2BF16 is that rounding in one instruction:
// nearest even, NaN quieted with its sign and payload kept, as there. It differs only for denormal inputs, which it
// flushes to zero (|x| < 1.2e-38: no activation of a bf16 model lands there but an exact zero).
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load16(const at::BFloat16* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m256i narrow_bf16(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }
inline __m512 round_bf16(__m512 v) { return widen_bf16(narrow_bf16(v)); }
inline void store16(at::BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v)); }

#endif

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
      bool summed = false;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (rr) {  // residual += x in 16 lanes; the sum of squares below reads it back (same order as the loop)
          int64_t i = 0;
          for (; i + 16 <= n; i += 16) store16(rr + i, _mm512_add_ps(load16(rr + i), load16(xr + i)));
          for (; i < n; ++i) store(rr, i, load(rr, i) + load(xr, i));
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            const float h = load(rr, j);
            sum += h * h;
          }
          summed = true;
        }
      }
#endif
      if (summed) {
      } else if (rr) {
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
      int64_t i0 = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {  // the loop below, 16 lanes at a time (see load16)
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; i0 + 16 <= n; i0 += 16)
          store16(orow + i0, _mm512_mul_ps(load16(weight + i0), round_bf16(_mm512_mul_ps(load16(src + i0), vinv))));
      }
#endif
#pragma omp simd
      for (int64_t i = i0; i < n; ++i) {
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
        int64_t i0 = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, at::BFloat16>) {  // the loop below, 16 lanes at a time (see load16)
          const __m512 sign = _mm512_set1_ps(-0.0f);
          for (; i0 + 16 <= half; i0 += 16) {
            const __m512 x1 = load16(r + i0), x2 = load16(r + i0 + half);
            const __m512 a1 = round_bf16(_mm512_mul_ps(x1, load16(c + i0)));
            const __m512 b1 = round_bf16(_mm512_mul_ps(_mm512_xor_ps(x2, sign), load16(s + i0)));
            const __m512 a2 = round_bf16(_mm512_mul_ps(x2, load16(c + i0 + half)));
            const __m512 b2 = round_bf16(_mm512_mul_ps(x1, load16(s + i0 + half)));
            store16(r + i0, _mm512_add_ps(a1, b1));
            store16(r + i0 + half, _mm512_add_ps(a2, b2));
          }
        }
#endif
#pragma omp simd
        for (int64_t i = i0; i < half; ++i) {
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

#if defined(__AVX512BF16__)
// exp_nonpos (exp_nonpos.h) in 16 lanes, operation for operation (no fused multiply-adds, as the scalar
// one under this file's fp-contract=off), so both give the same bits.
inline __m512 exp_nonpos16(__m512 x) {
  const auto c = [](float v) { return _mm512_set1_ps(v); };
  x = _mm512_max_ps(x, c(-87.3f));  // NaN -> -87.3 (the second operand), as the scalar ternary
  const __m512 kRound = c(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, c(1.44269504088896341f)), kRound), kRound);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, c(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, c(-2.12194440e-4f)));
  __m512 p = c(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), c(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), c(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), c(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), c(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), c(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), c(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// silu(g) * u for 16 bf16 lanes, as the scalar loop of silu_mul_rows computes it
inline void silu_mul16(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* o) {
  const __m512 x = load16(g);
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 neg_x = _mm512_xor_ps(x, _mm512_set1_ps(-0.0f));
  const __m512 e = exp_nonpos16(_mm512_mask_blend_ps(pos, x, neg_x));
  const __m512 num = _mm512_mask_blend_ps(pos, _mm512_mul_ps(x, e), x);
  const __m512 silu = round_bf16(_mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
  store16(o, _mm512_mul_ps(silu, load16(u)));
}
#endif

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t F, int64_t stride) {
  at::parallel_for(0, rows, grain_rows(2 * F), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gu + t * stride;
      const T* u = g + F;
      T* o = out + t * F;
      int64_t i0 = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        for (; i0 + 16 <= F; i0 += 16) silu_mul16(g + i0, u + i0, o + i0);
      }
#endif
#pragma omp simd
      for (int64_t i = i0; i < F; ++i) store(o, i, silu_times<!std::is_same_v<T, float>>(load(g, i), load(u, i)));  // silu_mul.h
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
