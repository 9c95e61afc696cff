// The float vector layer shared by the CPU kernels that are written once for AVX-512 and AVX2 (the
// paged prefill attention and the panel matmul; cpu_kernels.py hashes this header into every build): 16
// float lanes on AVX-512, 8 on AVX2 (a Zen 3). Only the widest ISA the build has is defined; a kernel
// built for neither does not use it.
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
using vfloat = __m512;
constexpr int kLanes = 16;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vset1(float x) { return _mm512_set1_ps(x); }
inline vfloat vload(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
inline vfloat vloadu(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm512_store_ps(p, x); }
inline void vstoreu(float* p, vfloat x) { _mm512_storeu_ps(p, x); }
inline void vstream(float* p, vfloat x) { _mm512_stream_ps(p, x); }  // non-temporal, 64-byte aligned
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c
inline vfloat vfnma(vfloat a, vfloat b, vfloat c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline float hmax(vfloat x) { return _mm512_reduce_max_ps(x); }
inline float hsum(vfloat x) { return _mm512_reduce_add_ps(x); }
// 2^n for whole-valued float lanes n in the exponent's range
inline vfloat pow2i(vfloat n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// x in the first n lanes (any n: <= 0 keeps none, >= kLanes all), `fill` in the others
inline vfloat first_lanes(vfloat x, int64_t n, vfloat fill) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
  return _mm512_mask_blend_ps(m, fill, x);
}
// kLanes floats rounded to bf16 (nearest even, as torch rounds; no NaN reaches here: softmax weights and
// value rows are finite) and stored
inline void store_bf16(uint16_t* dst, vfloat x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
// 2 x kLanes bf16 stored as lane pairs (j, j + kLanes) in each 32-bit lane, widened (exact) to the
// float vectors of elements 0..kLanes-1 (lo) and kLanes..2 kLanes-1 (hi)
inline void widen_bf16(const uint16_t* p, vfloat& lo, vfloat& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
using vfloat = __m256;
constexpr int kLanes = 8;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vset1(float x) { return _mm256_set1_ps(x); }
inline vfloat vload(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
inline vfloat vloadu(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm256_store_ps(p, x); }
inline void vstoreu(float* p, vfloat x) { _mm256_storeu_ps(p, x); }
inline void vstream(float* p, vfloat x) { _mm256_stream_ps(p, x); }  // non-temporal, 32-byte aligned
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vfnma(vfloat a, vfloat b, vfloat c) { return _mm256_fnmadd_ps(a, b, c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline float hmax(vfloat x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hsum(vfloat x) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}
inline vfloat pow2i(vfloat n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vfloat first_lanes(vfloat x, int64_t n, vfloat fill) {
  const int keep = static_cast<int>(std::clamp<int64_t>(n, 0, kLanes));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(keep), lane)));
}
inline void store_bf16(uint16_t* dst, vfloat x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // the 32-bit lanes hold values <= 0xFFFF, so the unsigned saturating pack is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline void widen_bf16(const uint16_t* p, vfloat& lo, vfloat& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

#endif
