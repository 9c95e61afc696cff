// Paged decode attention on CPU: one query token per sequence, keys/values read in place from the
// paged KV cache (no gather copy).
//
//   q            [B, H, D]            float32 or bfloat16
//   k_cache      [KVH, NB, BS, D]     same dtype as q; any strides with stride(-1) == 1
//   v_cache      [KVH, NB, BS, D]     same shape / dtype as k_cache
//   block_table  [B, MAXBLK] int64    block ids of each sequence, in order (entries past the context are ignored)
//   context_lens [B] int64            tokens in each sequence's context (1 .. MAXBLK * BS)
//   use_amx      bool                 bf16 scores on AMX tiles where the CPU has them (false: the vector path)
//   out          [B, H, D] or None    where to write the result (contiguous, q's dtype), else a new tensor
//   returns      [B, H, D]            softmax(q K^T * scale) V, in q's dtype
//
// GQA: query head h reads kv head h / (H / KVH). Work is split over (sequence, kv head) pairs, each thread a
// contiguous range of them holding about equal context (see decode_attention); each pair
// handles all of its group's query heads together so every K/V row is loaded (and, for bf16, converted
// to float) once. Softmax is two-pass over a float32 score buffer: scores for the whole context, then
// max / exp / sum, then the weighted sum of V rows. Everything accumulates in float32. (A one-pass online
// softmax measured slower here: per-block max/exp/rescale costs more than re-walking the block table.)
// Each block's rows are prefetched into L2 kFarBlocks ahead of use, the prefetches spread over the block's
// work and running on into the next item's first blocks (see kFarBlocks and kSpreadFarPrefetch; bf16 on
// AVX2 asks for them in a burst, and for the next block's into L1).
//
// bf16 with head_dim 64 or 128 (the models served): pass 1 is AMX tile multiplies where the CPU has
// AMX-BF16 (16 rows against all of a group's heads at once), else vdpbf16ps, else (AVX-512 without BF16,
// an Ice Lake) fp32's FMAs on K widened in registers; pass 2 widens V in registers.
// Same run, 64 sequences x 320 tokens, 2 threads, 30 layers' caches in turn: 1.23 ms a layer before
// either, 0.95 with the pass 2 change, 0.84 with both (python -m benchmarks.attention_kernel).
// fp32 with head_dim 64 or 128 takes the same two shapes with plain FMAs (any AVX-512 CPU): on a Zen 4,
// 2.45 -> 2.09 and 1.81 -> 1.51 ms a layer (alternating runs), a 64-sequence decode step 150.6 -> 141.1
// and 154.7 -> 145.3 ms median (python -m benchmarks.decode_step --dtype float32).
//
// Built by services/engine/cpu_kernels.py with -O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fopenmp
// (at::parallel_for is header-inlined OpenMP; without -fopenmp it would silently run on one thread).

// Narrow includes instead of <torch/extension.h>: the same pybind/ATen pieces, a third of the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TANDEM_AVX2_ONLY 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define TANDEM_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "exp_nonpos.h"
#include "simd.h"
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// The hot loops live in small non-inlined functions: inlined into the OpenMP-outlined parallel_for body,
// gcc 12 left some of them scalar (the exp loop) or spilled their accumulators to the stack every row.
#define NOINLINE __attribute__((noinline))

// bf16 -> float32 is exact: the bf16 bits are the top half of the float's
inline const float* as_float_row(const at::BFloat16* src, float* __restrict scratch, int64_t n) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = bf16_bits_to_float(s[i]);
  }
  return scratch;
}

inline void load_q_row(const float* src, float* __restrict dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_q_row(const at::BFloat16* src, float* __restrict dst, int64_t n) { as_float_row(src, dst, n); }

inline void store_row(const float* __restrict src, float* __restrict dst, int64_t n, float mul) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
}

inline void store_row(const float* __restrict src, at::BFloat16* __restrict dst, int64_t n, float mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i] * mul);  // round to nearest even
}

// Lanes of the partial dot products below: one native float vector (simd.h's kLanes where the build has
// AVX-512 or AVX2).
#if !defined(__AVX512F__) && !defined(TANDEM_AVX2_ONLY)
constexpr int kLanes = 8;
#endif

// s[t] = (q . rows[t]) * scale for one block's n rows. Each row's products are first summed into kLanes
// partial sums (one vector FMA per kLanes elements; DT > 0 makes head_dim a compile-time constant, so this
// unrolls completely), then the partials of up to 16 rows are summed lane by lane in a second loop that
// gcc vectorises across rows. Summing each row's lanes on its own instead (the obvious
// `s += a[i] * b[i]` reduction) costs a horizontal shuffle-and-add chain per row, ~2x slower here.
template <int DT>
NOINLINE void score_block(float* __restrict s, const float* __restrict q, const float* __restrict rows,
                          int64_t stride, int64_t n, int64_t D, float scale) {
  constexpr int W = kLanes;
  constexpr int64_t kRows = 16;
  const int64_t nd = DT > 0 ? DT : D;
  const int64_t nv = nd / W * W;
  float partial[kRows][W];
  float tail[kRows];
  for (int64_t t0 = 0; t0 < n; t0 += kRows) {
    const int64_t m = std::min(kRows, n - t0);
    for (int64_t t = 0; t < m; ++t) {
      const float* __restrict r = rows + (t0 + t) * stride;
      float lanes[W] = {};
      for (int64_t c = 0; c < nv; c += W)
        for (int l = 0; l < W; ++l) lanes[l] += q[c + l] * r[c + l];
      for (int l = 0; l < W; ++l) partial[t][l] = lanes[l];
      float x = 0.f;
      for (int64_t d = nv; d < nd; ++d) x += q[d] * r[d];
      tail[t] = x;
    }
    for (int64_t t = 0; t < m; ++t) {
      float x = tail[t];
      for (int l = 0; l < W; ++l) x += partial[t][l];
      s[t0 + t] = x * scale;
    }
  }
}

#if defined(__AVX512F__)
// lane t of the result = the sum of r[t]'s 16 lanes: a transpose-and-add tree (45 shuffles and adds
// for 16 rows) instead of one horizontal reduction per row (~9 dependent ops each, and a scalar store)
inline __m512 sum_lanes_16(const __m512* r) {
  __m512 pairs[8];  // each 128-bit lane: (row 2i, row 2i+1) partial sums interleaved
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
  __m512 quads[4];  // each 128-bit lane: rows 4i..4i+3, one partial sum each
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 halves[2];  // 128-bit lanes: (quad 2i: lanes 0+1, 2+3), (quad 2i+1: lanes 0+1, 2+3)
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 elements of a cache row as float32: fp32 loaded as is, bf16 widened in registers (exact: a bf16 is a
// float's top half)
inline __m512 load16_ps(const float* r) { return _mm512_loadu_ps(r); }
inline __m512 load16_ps(const at::BFloat16* r) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
#if defined(__AVX512BF16__)
  return _mm512_cvtpbh_ps((__m256bh)half);
#else
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
#endif
}

// Scores in float32, 16 rows at a time, the same shape as the bf16 dot path below: each row's D products
// in one vector (D / 16 FMAs), then the 16 vectors reduced together. It replaces the generic score_block,
// which gcc vectorised across a row's lanes but then summed each row through a stack buffer. fp32 rows are
// loaded as they are; bf16 rows (a CPU without AVX512-BF16, an Ice Lake) are widened in registers, where the
// generic path widened each block into a scratch buffer first: on an Ice Lake Xeon (2 threads, 64 sequences
// x 320 tokens, alternating) a bf16 layer's attention took 2.01 -> 1.67 ms median.
template <int NC, typename T>  // head_dim / 16, the cache's element type
NOINLINE void score_block_f32_n(float* __restrict s, const float* q, const T* rows, int64_t stride, int64_t n,
                                float scale) {
  __m512 qa[NC];
  for (int c = 0; c < NC; ++c) qa[c] = _mm512_loadu_ps(q + 16 * c);
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t t0 = 0;
  for (; t0 + 16 <= n; t0 += 16) {
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) {
      const T* r = rows + (t0 + t) * stride;
      acc[t] = _mm512_mul_ps(qa[0], load16_ps(r));
      for (int c = 1; c < NC; ++c) acc[t] = _mm512_fmadd_ps(qa[c], load16_ps(r + 16 * c), acc[t]);
    }
    _mm512_storeu_ps(s + t0, _mm512_mul_ps(sum_lanes_16(acc), vscale));
  }
  if (t0 < n) {  // the last rows of a sequence's last block: no loads past them (the block may end there)
    const int m = static_cast<int>(n - t0);
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int t = 0; t < m; ++t) {
      const T* r = rows + (t0 + t) * stride;
      for (int c = 0; c < NC; ++c) acc[t] = _mm512_fmadd_ps(qa[c], load16_ps(r + 16 * c), acc[t]);
    }
    _mm512_mask_storeu_ps(s + t0, static_cast<__mmask16>((1u << m) - 1), _mm512_mul_ps(sum_lanes_16(acc), vscale));
  }
}

#endif

#if defined(__AVX512BF16__)
// The bf16 scores without widening K: vdpbf16ps multiplies bf16 pairs exactly and accumulates in float32,
// 32 elements an instruction, straight from the cache's rows (D % 32 == 0). Widening each K row to float
// first (the generic path) cost as much as the dot products; with it gone, pass 1 reads K once, at
// memory speed. q is the bf16 query row itself.
constexpr bool kHaveBf16Dot = true;

// s[t] = (q . rows[t]) * scale, 16 rows at a time: each row's products summed in one vector, then the
// 16 vectors reduced together. On a Zen 4 without AMX (where this is pass 1): 1.59 -> 1.52 ms a layer
// (2 threads) and 2.68 -> 2.56 (1 thread), 64 sequences x ~320 tokens over 30 layers' scattered caches,
// interleaved in one process: the kernel waits on memory more than on these instructions.
template <int NC>  // head_dim / 32
NOINLINE void score_block_bf16_n(float* __restrict s, const at::BFloat16* q, const at::BFloat16* rows, int64_t stride,
                                 int64_t n, float scale) {
  __m512bh qa[NC];
  for (int c = 0; c < NC; ++c) qa[c] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(q + 32 * c));
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t t0 = 0;
  for (; t0 + 16 <= n; t0 += 16) {
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) {
      const at::BFloat16* r = rows + (t0 + t) * stride;
      acc[t] = _mm512_setzero_ps();
      for (int c = 0; c < NC; ++c)
        acc[t] = _mm512_dpbf16_ps(acc[t], qa[c], (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(r + 32 * c)));
    }
    _mm512_storeu_ps(s + t0, _mm512_mul_ps(sum_lanes_16(acc), vscale));
  }
  if (t0 < n) {  // the last rows of a sequence's last block: no loads past them (the block may end there)
    const int m = static_cast<int>(n - t0);
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int t = 0; t < m; ++t) {
      const at::BFloat16* r = rows + (t0 + t) * stride;
      for (int c = 0; c < NC; ++c)
        acc[t] = _mm512_dpbf16_ps(acc[t], qa[c], (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(r + 32 * c)));
    }
    _mm512_mask_storeu_ps(s + t0, static_cast<__mmask16>((1u << m) - 1), _mm512_mul_ps(sum_lanes_16(acc), vscale));
  }
}

NOINLINE void score_block_bf16(float* __restrict s, const at::BFloat16* q, const at::BFloat16* rows, int64_t stride,
                               int64_t n, int64_t D, float scale) {
  switch (D) {
    case 64: score_block_bf16_n<2>(s, q, rows, stride, n, scale); return;
    case 128: score_block_bf16_n<4>(s, q, rows, stride, n, scale); return;
    default: break;
  }
  for (int64_t t = 0; t < n; ++t) {
    const at::BFloat16* r = rows + t * stride;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 32) {
      const __m512bh qa = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(q + c));
      const __m512bh ka = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(r + c));
      acc = _mm512_dpbf16_ps(acc, qa, ka);
    }
    s[t] = _mm512_reduce_add_ps(acc) * scale;
  }
}
#else
constexpr bool kHaveBf16Dot = false;
NOINLINE void score_block_bf16(float*, const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, int64_t, float) {}
#endif

#if defined(__AVX512F__)
// Pass 2 without a widened copy of V: each row's 16-element chunks are loaded into registers (bf16 widened
// there, exact) and multiplied into GN heads' accumulators, which stay in vector
// registers for the whole item. Against widening each block into a scratch buffer first and summing from
// there: the decode attention kernel 1.23 -> 0.95 ms a layer (64 sequences x 320 tokens, 2 threads).
template <typename T, int NCH, int GN>
NOINLINE void accumulate_heads(float* __restrict acc, const T* v_head, int64_t blk_stride,
                                    int64_t tok_stride, const int64_t* table, int64_t len, int64_t BS,
                                    const float* __restrict p, int64_t p_stride) {
  __m512 a[GN][NCH];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < NCH; ++c) a[g][c] = _mm512_setzero_ps();
  const int64_t nblk = (len + BS - 1) / BS;
  // bf16 rows (NCH even): each 32-element chunk is one load, its 32-bit lanes a pair of dims (2j, 2j + 1);
  // simd.h's widen_bf16 widens the even dims by a shift left by 16 and the odd ones by a mask (exact), three
  // instructions for 32 elements where widening each 16 took two, and a[g][2c] / a[g][2c + 1] sum chunk c's
  // even / odd dims
  // (Zen 4, 2 threads, alternating builds, python -m benchmarks.attention_kernel: 0.979 of the time with
  // the cache in memory, 0.954 with it in L3)
  constexpr bool kPairs = std::is_same_v<T, at::BFloat16> && NCH % 2 == 0;
  for (int64_t i = 0; i < nblk; ++i) {
    const int64_t n = std::min(BS, len - i * BS);
    const T* blk = v_head + table[i] * blk_stride;
    const float* pb = p + i * BS;
    for (int64_t t = 0; t < n; ++t) {
      const T* row = blk + t * tok_stride;
      __m512 w[GN];
      for (int g = 0; g < GN; ++g) w[g] = _mm512_set1_ps(pb[g * p_stride + t]);
      if constexpr (kPairs) {
        for (int c = 0; c < NCH / 2; ++c) {
          __m512 even, odd;
          widen_bf16(reinterpret_cast<const uint16_t*>(row + 32 * c), even, odd);
          for (int g = 0; g < GN; ++g) {
            a[g][2 * c] = _mm512_fmadd_ps(w[g], even, a[g][2 * c]);
            a[g][2 * c + 1] = _mm512_fmadd_ps(w[g], odd, a[g][2 * c + 1]);
          }
        }
      } else {
        for (int c = 0; c < NCH; ++c) {
          const __m512 x = load16_ps(row + 16 * c);
          for (int g = 0; g < GN; ++g) a[g][c] = _mm512_fmadd_ps(w[g], x, a[g][c]);
        }
      }
    }
  }
  for (int g = 0; g < GN; ++g) {
    if constexpr (kPairs) {  // dims back in order: chunk c's even and odd sums interleaved
      for (int c = 0; c < NCH / 2; ++c) {
        alignas(64) float even[16], odd[16];
        _mm512_store_ps(even, a[g][2 * c]);
        _mm512_store_ps(odd, a[g][2 * c + 1]);
        float* dst = acc + g * NCH * 16 + 32 * c;
        for (int j = 0; j < 16; ++j) {
          dst[2 * j] = even[j];
          dst[2 * j + 1] = odd[j];
        }
      }
    } else {
      for (int c = 0; c < NCH; ++c) _mm512_storeu_ps(acc + (g * NCH + c) * 16, a[g][c]);
    }
  }
}

// acc [G, 16 * NCH] = p [G, len] . V: the group's heads in runs small enough for their accumulators to stay
// in registers (GN * NCH <= 24 of the 32), each run one walk over V (from cache: pass 1 prefetched it)
template <typename T, int NCH>
void accumulate_item(int64_t G, float* acc, const T* v_head, int64_t blk_stride, int64_t tok_stride,
                          const int64_t* table, int64_t len, int64_t BS, const float* p, int64_t p_stride) {
  constexpr int kMaxHeads = 24 / NCH;
  static_assert(kMaxHeads >= 1 && kMaxHeads <= 6, "accumulate_item: cases below cover 1..6 heads a run");
  for (int64_t g0 = 0; g0 < G; g0 += kMaxHeads) {
    const int64_t gn = std::min<int64_t>(kMaxHeads, G - g0);
    float* ag = acc + g0 * NCH * 16;
    const float* pg = p + g0 * p_stride;
    switch (gn) {
#define TANDEM_PV_CASE(K)                                                                              \
  case K:                                                                                              \
    if constexpr (K <= kMaxHeads) accumulate_heads<T, NCH, K>(ag, v_head, blk_stride, tok_stride, table, len, BS, pg, p_stride); \
    break;
      TANDEM_PV_CASE(1)
      TANDEM_PV_CASE(2)
      TANDEM_PV_CASE(3)
      TANDEM_PV_CASE(4)
      TANDEM_PV_CASE(5)
      TANDEM_PV_CASE(6)
#undef TANDEM_PV_CASE
    }
  }
}
#endif


#if defined(TANDEM_AVX2_ONLY)
// bf16 on AVX2 machines (no AVX-512): both passes in 8-lane registers, each row widened there once for
// all of a group's heads. Before, the generic loops widened the rows into a scratch buffer and read them
// back once per query head: on a Zen 3, 64 sequences x 320 tokens, 2 threads, one layer's cache, bf16
// took 1.47 ms a layer (10.7 GB/s of K and V: compute bound) against fp32's 1.63 (19 GB/s) for twice
// the bytes. In one engine, alternating, the 64-sequence bf16 decode step went 157.9 -> 149.6 ms median
// (156.7 -> 149.0 in a second run), the 16-sequence one 46.3 -> 43.8.
// fp32 does not take these: through them it measured level in the engine (178.0 -> 181.7 ms) and 12%
// slower over 30 layers' scattered caches (12-05; again 12-07, 72-74 against 68-70 ms a step). Its scores
// take score_rows_f32_avx2 below, its V pass the generic accumulate_block.

// 8 bf16 elements of a cache row as float32, widened in registers (exact)
inline __m256 load8_ps(const at::BFloat16* r) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// lane t of the result = the sum of r[t]'s 8 lanes
inline __m256 sum_lanes_8(const __m256* r) {
  const __m256 t0 = _mm256_hadd_ps(r[0], r[1]), t1 = _mm256_hadd_ps(r[2], r[3]);
  const __m256 t2 = _mm256_hadd_ps(r[4], r[5]), t3 = _mm256_hadd_ps(r[6], r[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: rows 0-3, 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Pass 1 for GN query heads over one block's n rows: each row's NCH 8-element chunks loaded (and widened)
// once and multiplied into the GN heads' accumulators, 8 rows' sums then reduced together.
// s[g * s_stride + t] = (q_g . rows[t]) * scale; qf: the heads' float rows, D = 8 * NCH apart.
template <typename T, int NCH, int GN>
NOINLINE void score_heads_avx2(float* __restrict s, int64_t s_stride, const float* __restrict qf, const T* rows,
                               int64_t stride, int64_t n, float scale) {
  constexpr int64_t D = 8 * NCH;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < n; t0 += 8) {
    const int64_t m = std::min<int64_t>(8, n - t0);
    __m256 part[GN][8];
    for (int64_t t = 0; t < 8; ++t) {
      __m256 a[GN];
      for (int g = 0; g < GN; ++g) a[g] = _mm256_setzero_ps();
      if (t < m) {
        const T* r = rows + (t0 + t) * stride;
        for (int c = 0; c < NCH; ++c) {
          const __m256 x = load8_ps(r + 8 * c);
          for (int g = 0; g < GN; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + 8 * c), x, a[g]);
        }
      }
      for (int g = 0; g < GN; ++g) part[g][t] = a[g];
    }
    for (int g = 0; g < GN; ++g) {
      const __m256 v = _mm256_mul_ps(sum_lanes_8(part[g]), vscale);
      if (m == 8) {
        _mm256_storeu_ps(s + g * s_stride + t0, v);
      } else {  // a sequence's last block: nothing written past its rows
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        std::memcpy(s + g * s_stride + t0, tmp, m * sizeof(float));
      }
    }
  }
}

template <typename T, int NCH>
void score_block_avx2(float* s, int64_t s_stride, const float* qf, int64_t G, const T* rows, int64_t stride, int64_t n,
                      float scale) {
  constexpr int64_t D = 8 * NCH;
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    float* sg = s + g0 * s_stride;
    const float* qg = qf + g0 * D;
    switch (std::min<int64_t>(4, G - g0)) {
      case 1: score_heads_avx2<T, NCH, 1>(sg, s_stride, qg, rows, stride, n, scale); break;
      case 2: score_heads_avx2<T, NCH, 2>(sg, s_stride, qg, rows, stride, n, scale); break;
      case 3: score_heads_avx2<T, NCH, 3>(sg, s_stride, qg, rows, stride, n, scale); break;
      default: score_heads_avx2<T, NCH, 4>(sg, s_stride, qg, rows, stride, n, scale); break;
    }
  }
}

// Pass 2 for GN heads and 32 of the D dims (chunks c0..c0+3): GN x 4 accumulators, GN weights and a row
// chunk fill AVX2's 16 registers at GN = 3. Walking V once per 32 dims reads each row's bytes once all
// the same (the segments are different cache lines); only the block table and weights are walked again.
template <typename T, int GN>
NOINLINE void accumulate_segment_avx2(float* __restrict acc, int64_t D, int64_t c0, const T* v_head,
                                      int64_t blk_stride, int64_t tok_stride, const int64_t* table, int64_t len,
                                      int64_t BS, const float* __restrict p, int64_t p_stride) {
  __m256 a[GN][4];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < 4; ++c) a[g][c] = _mm256_setzero_ps();
  const int64_t nblk = (len + BS - 1) / BS;
  for (int64_t i = 0; i < nblk; ++i) {
    const int64_t n = std::min(BS, len - i * BS);
    const T* blk = v_head + table[i] * blk_stride + 8 * c0;
    const float* pb = p + i * BS;
    for (int64_t t = 0; t < n; ++t) {
      const T* row = blk + t * tok_stride;
      __m256 w[GN];
      for (int g = 0; g < GN; ++g) w[g] = _mm256_broadcast_ss(pb + g * p_stride + t);
      for (int c = 0; c < 4; ++c) {
        const __m256 x = load8_ps(row + 8 * c);
        for (int g = 0; g < GN; ++g) a[g][c] = _mm256_fmadd_ps(w[g], x, a[g][c]);
      }
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + g * D + 8 * (c0 + c), a[g][c]);
}

// acc [G, D] = p [G, len] . V, D a multiple of 32
template <typename T>
void accumulate_item_avx2(int64_t G, int64_t D, float* acc, const T* v_head, int64_t blk_stride, int64_t tok_stride,
                          const int64_t* table, int64_t len, int64_t BS, const float* p, int64_t p_stride) {
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    float* ag = acc + g0 * D;
    const float* pg = p + g0 * p_stride;
    for (int64_t c0 = 0; c0 < D / 8; c0 += 4) {
      switch (std::min<int64_t>(3, G - g0)) {
        case 1: accumulate_segment_avx2<T, 1>(ag, D, c0, v_head, blk_stride, tok_stride, table, len, BS, pg, p_stride); break;
        case 2: accumulate_segment_avx2<T, 2>(ag, D, c0, v_head, blk_stride, tok_stride, table, len, BS, pg, p_stride); break;
        default: accumulate_segment_avx2<T, 3>(ag, D, c0, v_head, blk_stride, tok_stride, table, len, BS, pg, p_stride); break;
      }
    }
  }
}
#endif

// exp_nonpos(x) for x <= 0: exp_nonpos.h (scores minus their max here)

// in place: s[i] = exp(s[i] - m); returns the sum (two loops: the exp loop has no reduction to privatise)
NOINLINE float exp_sum(float* __restrict s, int64_t n, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = exp_nonpos(s[i] - m);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += s[i];
  return sum;
}

NOINLINE float max_of(const float* __restrict s, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = m > s[i] ? m : s[i];
  return m;
}

// acc[0:D] += sum_t p[t] * rows[t * stride + 0:D] over one block's n rows. DT > 0: the accumulator is a
// fixed-size local array, which gcc keeps in vector registers for the whole block.
template <int DT>
NOINLINE void accumulate_block(float* __restrict acc, const float* __restrict rows, int64_t stride,
                              const float* __restrict p, int64_t n, int64_t D) {
  if constexpr (DT > 0) {
    float a[DT];
    for (int d = 0; d < DT; ++d) a[d] = acc[d];
    for (int64_t t = 0; t < n; ++t) {
      const float pt = p[t];
      const float* __restrict r = rows + t * stride;
      // plain -O3 vectorisation on purpose: under `omp simd` gcc 12 spills `a` to the stack every token
      for (int d = 0; d < DT; ++d) a[d] += pt * r[d];
    }
    for (int d = 0; d < DT; ++d) acc[d] = a[d];
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const float pt = p[t];
      const float* __restrict r = rows + t * stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += pt * r[d];
    }
  }
}

// One block's n rows as float rows: fp32 rows in place (returning their stride), bf16 rows widened into
// scratch (stride D), each row converted once for all the query heads of the group.
inline const float* block_rows(const float* blk, int64_t stride, int64_t n, int64_t D, float* /*scratch*/,
                               int64_t& out_stride) {
  (void)n;
  (void)D;
  out_stride = stride;
  return blk;
}

inline const float* block_rows(const at::BFloat16* blk, int64_t stride, int64_t n, int64_t D, float* scratch,
                               int64_t& out_stride) {
  for (int64_t t = 0; t < n; ++t) as_float_row(blk + t * stride, scratch + t * D, D);
  out_stride = D;
  return scratch;
}

struct Strides {
  int64_t h, blk, tok;  // kv head, block, token (elements); the head_dim stride is 1
};

// Touch every cache line of a block's first n rows ahead of use: blocks sit at random places in the cache,
// so the hardware prefetcher cannot see the next one coming. kLocality 3 asks for L1, 2 for L2.
// The empty volatile asm is a side effect gcc must keep: without it, gcc 12 found a helper whose only
// effect was prefetching (prefetch_far_share, the AMX path's look-ahead once) free of side effects and
// deleted the calls to it, prefetches and all, making the kernel 1.3-1.6x slower.
template <typename T, int kLocality = 3>
inline void prefetch_block(const T* blk, int64_t row_stride, int64_t n, int64_t D) {
  asm volatile("");
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < n; ++t) {
    const char* r = reinterpret_cast<const char*>(blk + t * row_stride);
    for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(r + c, 0, kLocality);
  }
}
// Pass 1 asks for the rows of the block kFarBlocks ahead into L2 (prefetcht1). In the block-major cache
// a sequence's blocks are a whole block (368-720 KiB) apart, so each block's rows are a fresh page to the
// hardware prefetcher; one block of look-ahead is shorter than a DRAM round trip. Same run, 64 sequences
// x ~320 tokens, alternating with one block ahead only (Zen 4): bf16 -4 to -5% a step's attention with a
// new pool's tables, -8 to -10% with an aged pool's; fp32 -2% and -10% (2 and 8 blocks ahead measured
// within a few percent of 4, again on 12-07 with the spread prefetches below).
// Near the end of an item the far block is the next item's (the next of this thread's range), so the
// stream of prefetches runs on across items instead of stopping for each item's last kFarBlocks blocks
// and its pass 2 and starting again with a demand miss on the next item's first block. Zen 4, 2 threads,
// fp32, 64 sequences x 320 tokens over 30 layers' scattered caches (python -m benchmarks.attention_kernel),
// alternating builds: 0.963 of the time alone, and with the spread below 0.766 against 0.860 without it.
constexpr int64_t kFarBlocks = 4;
// The far block's prefetches are spread over the block's work, each query head's scores preceded by its
// share of the rows (score_rows_f32_avx2 issues each 4 rows' share with their scores on AVX2), and the next
// block's are left to the hardware (its rows are in L2 by then), instead of ~250 prefetches in a burst
// before each block, which stalled the core on the memory system's few outstanding misses with nothing
// else to do.
// - AVX-512 (Zen 4, 12-07, with the cross-item prefetch; same run as above): fp32 0.72-0.77 of the burst's
//   time, 19-22 -> 25-31 GB/s, where a 1 GiB sum reads 31; bf16 (vdpbf16ps) 0.875, 21.7 -> 25.2 GB/s.
//   Finer (a share before each row of the 16-row tiles): 1.08x the per-head shares. Into L1 (prefetcht0)
//   or prefetchnta instead of L2: 1.41x.
// - AVX2 (Zen 3), fp32 only, measured with the generic score_block: 66-69 -> 57-62 ms a step (13.7-14.7
//   -> 15.2-16.5 GB/s); no prefetch at all 68-71. In one engine, old and new alternating step by step, a
//   64-sequence fp32 decode step: median pair ratio 0.972 and 0.971 (195.8 -> 193.0, 205.2 -> 196.5 ms).
//   bf16 on AVX2 (score_block_avx2, all heads in one call) keeps the burst: not measured spread.
#if defined(TANDEM_AVX2_ONLY)
template <typename T>
constexpr bool kSpreadFarPrefetch = std::is_same_v<T, float>;
#else
template <typename T>
constexpr bool kSpreadFarPrefetch = true;
#endif

// The rows one far prefetch asks for: k and v at the same block and row (n rows, none when n == 0)
template <typename T>
struct FarRows {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t n = 0;
};

// share g of `shares` of the far rows, into L2: one query head's share before its scores
template <typename T>
inline void prefetch_far_share(const FarRows<T>& far, Strides ks, Strides vs, int64_t g, int64_t shares, int64_t D) {
  const int64_t r0 = g * far.n / shares, r1 = (g + 1) * far.n / shares;
  prefetch_block<T, 2>(far.k + r0 * ks.tok, ks.tok, r1 - r0, D);
  prefetch_block<T, 2>(far.v + r0 * vs.tok, vs.tok, r1 - r0, D);
}

#if defined(TANDEM_AVX2_ONLY)
// fp32 scores on AVX2 for GN (<= 3) heads, 4 rows at a time: 4 x GN partial-sum vectors (NCH FMAs each, q
// read as the FMAs' memory operand), reduced 4 rows to a vector by hadd. The far block's rows t0..t0+3
// are prefetched (pf_k / pf_v, into L2) with the same rows' work. Against the generic score_block, one
// head at a time with 16 rows' partials summed through a stack buffer (Zen 3, 2 threads, alternating
// builds, python -m benchmarks.attention_kernel --dtype float32): 58.8 -> 52.8-55.4 ms a step, 20 ->
// 24 GB/s with the cache in L2; a 64-sequence decode step in one engine, old and new alternating step
// by step: median pair ratios 0.991 and 0.976.
template <int NCH, int GN>
NOINLINE void score_rows_f32_avx2(float* __restrict s, int64_t s_stride, const float* __restrict qf, const float* rows,
                                  int64_t stride, int64_t n, float scale, const float* pf_k, const float* pf_v,
                                  int64_t pf_k_stride, int64_t pf_v_stride, int64_t pf_n) {
  constexpr int64_t D = 8 * NCH;
  const __m128 vscale = _mm_set1_ps(scale);
  int64_t t0 = 0;
  for (; t0 + 4 <= n; t0 += 4) {
    for (int64_t t = t0; t < std::min(t0 + 4, pf_n); ++t) {
      for (int64_t c = 0; c < D; c += 16) {
        __builtin_prefetch(pf_k + t * pf_k_stride + c, 0, 2);
        __builtin_prefetch(pf_v + t * pf_v_stride + c, 0, 2);
      }
    }
    __m256 a[GN][4];
    for (int g = 0; g < GN; ++g)
      for (int t = 0; t < 4; ++t) a[g][t] = _mm256_setzero_ps();
    for (int c = 0; c < NCH; ++c) {
      __m256 x[4];
      for (int t = 0; t < 4; ++t) x[t] = _mm256_loadu_ps(rows + (t0 + t) * stride + 8 * c);
      for (int g = 0; g < GN; ++g)
        for (int t = 0; t < 4; ++t) a[g][t] = _mm256_fmadd_ps(x[t], _mm256_loadu_ps(qf + g * D + 8 * c), a[g][t]);
    }
    for (int g = 0; g < GN; ++g) {
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]), _mm256_hadd_ps(a[g][2], a[g][3]));
      const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // rows t0..t0+3
      _mm_storeu_ps(s + g * s_stride + t0, _mm_mul_ps(sum, vscale));
    }
  }
  for (; t0 < n; ++t0) {  // a sequence's last rows
    for (int g = 0; g < GN; ++g) {
      __m256 a = _mm256_setzero_ps();
      for (int c = 0; c < NCH; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(rows + t0 * stride + 8 * c), _mm256_loadu_ps(qf + g * D + 8 * c), a);
      __m128 m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      m = _mm_add_ps(m, _mm_movehl_ps(m, m));
      s[g * s_stride + t0] = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m))) * scale;
    }
  }
}

template <int NCH>
void score_block_f32_avx2(float* s, int64_t s_stride, const float* qf, int64_t G, const float* rows, int64_t stride,
                          int64_t n, float scale, const float* pf_k, const float* pf_v, int64_t pf_k_stride,
                          int64_t pf_v_stride, int64_t pf_n) {
  constexpr int64_t D = 8 * NCH;
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    float* sg = s + g0 * s_stride;
    const float* qg = qf + g0 * D;
    const int64_t pn = g0 == 0 ? pf_n : 0;  // the far block once, with the first heads
    switch (std::min<int64_t>(3, G - g0)) {
      case 1: score_rows_f32_avx2<NCH, 1>(sg, s_stride, qg, rows, stride, n, scale, pf_k, pf_v, pf_k_stride, pf_v_stride, pn); break;
      case 2: score_rows_f32_avx2<NCH, 2>(sg, s_stride, qg, rows, stride, n, scale, pf_k, pf_v, pf_k_stride, pf_v_stride, pn); break;
      default: score_rows_f32_avx2<NCH, 3>(sg, s_stride, qg, rows, stride, n, scale, pf_k, pf_v, pf_k_stride, pf_v_stride, pn); break;
    }
  }
}
#endif

#if defined(TANDEM_HAVE_AMX)
// Pass 1 on AMX tiles: the scores of 16 cache rows against all of a group's query heads are one tile
// multiply per 32 dims of head_dim, C[16 rows x heads] += K[16 rows x 32] . Q^T[32 x heads], with K's tile
// loaded straight from the cache (its row stride), and Q^T laid out once per item in the pair-interleaved
// form AMX wants (two consecutive bf16 of a query row are one 32-bit element, so the layout is a copy of
// q's 32-bit words). Linux hands out the tile registers only to a process that asks (arch_prctl).
bool amx_granted() {
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tile 0: scores C [16 x 16] float; tile 1: a K chunk [16 rows x 32 bf16]; tiles 2..5: Q^T chunks
void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// qt [NCH][16 pairs][16 heads] uint32 from the group's G query rows (bf16, D = 32 * NCH), zero past G
template <int NCH>
void pack_q_for_tiles(uint32_t* __restrict qt, const at::BFloat16* q, int64_t q_sh, int64_t G) {
  std::memset(qt, 0, NCH * 16 * 16 * sizeof(uint32_t));
  for (int64_t g = 0; g < G; ++g) {
    const at::BFloat16* row = q + g * q_sh;
    for (int c = 0; c < NCH; ++c)
      for (int r = 0; r < 16; ++r) std::memcpy(&qt[(c * 16 + r) * 16 + g], row + 2 * (c * 16 + r), sizeof(uint32_t));
  }
}

template <int NCH>
void load_q_tiles(const uint32_t* qt) {
  _tile_loadd(2, qt, 64);
  if constexpr (NCH > 1) _tile_loadd(3, qt + 256, 64);
  if constexpr (NCH > 2) _tile_loadd(4, qt + 512, 64);
  if constexpr (NCH > 3) _tile_loadd(5, qt + 768, 64);
}

// scores of rows [0, m) of a 16-row run starting at `rows` (all 16 rows must be readable)
template <int NCH>
NOINLINE void score_rows_amx(float* __restrict s, int64_t s_stride, const at::BFloat16* rows, int64_t row_stride,
                             int64_t m, int64_t G, float scale) {
  alignas(64) float c[16][16];
  const int64_t stride_bytes = row_stride * static_cast<int64_t>(sizeof(at::BFloat16));
  _tile_zero(0);
  _tile_loadd(1, rows, stride_bytes);
  _tile_dpbf16ps(0, 1, 2);
  if constexpr (NCH > 1) {
    _tile_loadd(1, rows + 32, stride_bytes);
    _tile_dpbf16ps(0, 1, 3);
  }
  if constexpr (NCH > 2) {
    _tile_loadd(1, rows + 64, stride_bytes);
    _tile_dpbf16ps(0, 1, 4);
  }
  if constexpr (NCH > 3) {
    _tile_loadd(1, rows + 96, stride_bytes);
    _tile_dpbf16ps(0, 1, 5);
  }
  _tile_stored(0, c, 64);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < m; ++t) s[g * s_stride + t] = c[t][g] * scale;
}

// One item's pass 1 on tiles: scores [G, len] for the group's query rows q (bf16, head stride q_sh), K's
// blocks walked through the table with the next block's K and V rows prefetched (written out in place;
// see prefetch_block for why a helper's prefetches once vanished, making the kernel 40% slower).
// qt: 4 * 16 * 16 words of the calling thread's scratch. Needs BS % 16 == 0, so every 16-row run read is
// inside its block.
template <int NCH>
void score_item_amx(float* scores, int64_t s_stride, const at::BFloat16* q, int64_t q_sh, int64_t G,
                    const at::BFloat16* k_head, Strides ks, const at::BFloat16* v_head, Strides vs,
                    const int64_t* table, int64_t len, int64_t BS, float scale, uint32_t* qt) {
  constexpr int64_t D = 32 * NCH;
  pack_q_for_tiles<NCH>(qt, q, q_sh, G);
  load_q_tiles<NCH>(qt);
  const int64_t nblk = (len + BS - 1) / BS;
  for (int64_t i = 0; i < nblk; ++i) {
    const int64_t n = std::min(BS, len - i * BS);
    if (i + 1 < nblk) {
      const int64_t n_next = std::min(BS, len - (i + 1) * BS);
      prefetch_block(k_head + table[i + 1] * ks.blk, ks.tok, n_next, D);
      prefetch_block(v_head + table[i + 1] * vs.blk, vs.tok, n_next, D);
    }
    const at::BFloat16* blk = k_head + table[i] * ks.blk;
    for (int64_t j = 0; j < n; j += 16)
      score_rows_amx<NCH>(scores + i * BS + j, s_stride, blk + j * ks.tok, ks.tok, std::min<int64_t>(16, n - j), G,
                          scale);
  }
}
#endif

template <typename T, int DT>
void decode_attention(
    const T* q, int64_t q_sb, int64_t q_sh,  // q [B, H, D] strides (last is 1)
    const T* k, Strides ks, const T* v, Strides vs,
    const int64_t* block_table, int64_t bt_stride,
    const int64_t* lens,
    T* out,  // [B, H, D] contiguous
    int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale, bool use_amx) {
  const int64_t G = H / KVH;
  const bool q_sh_contiguous = true;  // q rows have stride 1 along D (checked by the caller)
  // Each thread takes one contiguous range of (sequence, kv head) items, so that its prefetches run on
  // from item to item, and the ranges hold about equal work (an item's context plus a block's worth for
  // its fixed costs) rather than equal item counts: a batch that mixes one long context with short ones
  // would otherwise leave a thread with the long one and most of the rest. Zen 4, 2 threads, alternating
  // builds: 8 sequences, one of 4,096 tokens and seven of 256, fp32 0.81 of the time; 16, one of 8,192 and
  // the rest of 300, bf16 0.81; 64 sequences of 240-400 tokens level (1.009, bf16 1.008).
  const int64_t items = B * KVH;
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::vector<int64_t> bounds(static_cast<size_t>(nthreads + 1), items);  // thread t: [bounds[t], bounds[t + 1])
  {
    auto work = [&](int64_t item) { return lens[item / KVH] + BS; };
    int64_t total = 0;
    for (int64_t item = 0; item < items; ++item) total += work(item);
    // thread t's range starts at the item boundary nearest t / nthreads of the total work
    bounds[0] = 0;
    int64_t done = 0, t = 1;
    for (int64_t item = 0; item < items && t < nthreads; ++item) {
      const int64_t before = done;
      done += work(item);
      for (; t < nthreads && done * nthreads >= total * t; ++t) {
        const bool nearer_before = total * t - before * nthreads < done * nthreads - total * t;
        bounds[t] = std::max(bounds[t - 1], nearer_before ? item : item + 1);
      }
    }
  }
  at::parallel_for(0, nthreads, 1, [&](int64_t t_begin, int64_t t_end) {
    const int64_t begin = bounds[t_begin], end = bounds[t_end];
    int64_t max_len = 0;
    for (int64_t item = begin; item < end; ++item) max_len = std::max(max_len, lens[item / KVH]);
    std::vector<float> scores(static_cast<size_t>(G * max_len));  // [G, len] per item
    std::vector<float> qf(static_cast<size_t>(G * D));
    std::vector<float> acc(static_cast<size_t>(G * D));
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : static_cast<size_t>(BS * D));
    std::vector<float> inv_sum(static_cast<size_t>(G));
#if defined(TANDEM_HAVE_AMX)
    constexpr bool kTileShape = std::is_same_v<T, at::BFloat16> && (DT == 64 || DT == 128);
    const bool amx = kTileShape && use_amx && BS % 16 == 0 && G <= 16 && amx_granted();
    alignas(64) uint32_t qt[4 * 16 * 16];
    if (amx) load_tile_config();
#endif

    // an item's cache rows: its sequence's block table and context, its kv head's K and V
    struct ItemRows {
      const int64_t* table = nullptr;
      int64_t len = 0, nblk = 0;
      const T* k = nullptr;
      const T* v = nullptr;
    };
    auto item_rows = [&](int64_t item) {
      const int64_t b = item / KVH, kvh = item % KVH;
      return ItemRows{block_table + b * bt_stride, lens[b], (lens[b] + BS - 1) / BS, k + kvh * ks.h, v + kvh * vs.h};
    };
    // block j's K and V rows of an item (j < its block count)
    auto block_of = [&](const ItemRows& it, int64_t j) -> FarRows<T> {
      return {it.k + it.table[j] * ks.blk, it.v + it.table[j] * vs.blk, std::min(BS, it.len - j * BS)};
    };
    // this item's leading blocks [lead_from, lead_to) still to prefetch when it starts: block 0 is read at
    // once, so the thread's first item asks for blocks 1.. only; the previous item's far prefetches
    // covered the rest of a later item's (all but the first kFarBlocks - its block count, when it had
    // fewer than kFarBlocks blocks)
    int64_t lead_from = 1, lead_to = kFarBlocks;

    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH;
      const int64_t kvh = item % KVH;
      const ItemRows cur = item_rows(item);
      const ItemRows next = item + 1 < end ? item_rows(item + 1) : ItemRows{};
      const int64_t len = cur.len;
      const int64_t nblk = cur.nblk;
      const int64_t* table = cur.table;
      const int64_t h0 = kvh * G;
      const T* k_head = cur.k;
      const T* v_head = cur.v;
      for (int64_t g = 0; g < G; ++g) load_q_row(q + b * q_sb + (h0 + g) * q_sh, qf.data() + g * D, D);
      // the rows pass 1 prefetches into L2 while it scores block i: block i + kFarBlocks of this item,
      // past its end the next item's first blocks (none past the thread's last item)
      auto far_rows = [&](int64_t i) -> FarRows<T> {
        int64_t j = i + kFarBlocks;
        const ItemRows* it = &cur;
        if (j >= cur.nblk) {
          j -= cur.nblk;
          it = &next;
        }
        if (j >= it->nblk) return {};
        return block_of(*it, j);
      };

      // pass 1: scores[g, pos] = (q_g . k_pos) * scale
      bool scored = false;
#if defined(TANDEM_HAVE_AMX)
      if constexpr (kTileShape) {
        if (amx) {
          score_item_amx<DT / 32>(scores.data(), len, q + b * q_sb + h0 * q_sh, q_sh, G, k_head, ks, v_head, vs, table,
                                  len, BS, scale, qt);
          scored = true;
        }
      }
#endif
      if (!scored) {
        for (int64_t i = lead_from; i < std::min(lead_to, nblk); ++i) prefetch_far_share(block_of(cur, i), ks, vs, 0, 1, D);
        lead_from = 0;
        lead_to = std::max<int64_t>(0, kFarBlocks - nblk);
      }
      for (int64_t i = 0; i < nblk && !scored; ++i) {
        const int64_t n = std::min(BS, len - i * BS);
        const FarRows<T> far = far_rows(i);
        if (!kSpreadFarPrefetch<T>) {
          prefetch_far_share(far, ks, vs, 0, 1, D);  // all of it
          if (i + 1 < nblk) {
            const int64_t n_next = std::min(BS, len - (i + 1) * BS);
            prefetch_block(k_head + table[i + 1] * ks.blk, ks.tok, n_next, D);
            // V's rows too, so pass 2 finds them in cache instead of waiting on a second random walk
            prefetch_block(v_head + table[i + 1] * vs.blk, vs.tok, n_next, D);
          }
        }
        if constexpr (std::is_same_v<T, at::BFloat16> && kHaveBf16Dot) {
          if (D % 32 == 0 && q_sh_contiguous) {
            for (int64_t g = 0; g < G; ++g) {
              if (kSpreadFarPrefetch<T>) prefetch_far_share(far, ks, vs, g, G, D);  // head g's share
              score_block_bf16(scores.data() + g * len + i * BS, q + b * q_sb + (h0 + g) * q_sh,
                               k_head + table[i] * ks.blk, ks.tok, n, D, scale);
            }
            continue;
          }
        }
#if defined(__AVX512F__)
        if constexpr (DT == 64 || DT == 128) {  // fp32, and bf16 without the dot path
          for (int64_t g = 0; g < G; ++g) {
            if (kSpreadFarPrefetch<T>) prefetch_far_share(far, ks, vs, g, G, D);
            score_block_f32_n<DT / 16>(scores.data() + g * len + i * BS, qf.data() + g * D, k_head + table[i] * ks.blk,
                                       ks.tok, n, scale);
          }
          continue;
        }
#endif
#if defined(TANDEM_AVX2_ONLY)
        if constexpr (std::is_same_v<T, float> && (DT == 64 || DT == 128)) {
          score_block_f32_avx2<DT / 8>(scores.data() + i * BS, len, qf.data(), G, k_head + table[i] * ks.blk, ks.tok, n, scale,
                                       far.k, far.v, ks.tok, vs.tok, far.n);
          continue;
        }
        if constexpr (std::is_same_v<T, at::BFloat16> && (DT == 64 || DT == 128)) {
          score_block_avx2<T, DT / 8>(scores.data() + i * BS, len, qf.data(), G, k_head + table[i] * ks.blk, ks.tok, n,
                                      scale);
          continue;
        }
#endif
        int64_t stride;
        const float* rows = block_rows(k_head + table[i] * ks.blk, ks.tok, n, D, scratch.data(), stride);
        for (int64_t g = 0; g < G; ++g) {
          if (kSpreadFarPrefetch<T>) prefetch_far_share(far, ks, vs, g, G, D);
          score_block<DT>(scores.data() + g * len + i * BS, qf.data() + g * D, rows, stride, n, D, scale);
        }
      }
      // softmax numerators and denominators
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * len;
        inv_sum[g] = 1.f / exp_sum(s, len, max_of(s, len));
      }
      // pass 2: acc[g] = sum_pos p[g, pos] * v_pos
      bool accumulated = false;
#if defined(__AVX512F__)
      if constexpr (DT == 64 || DT == 128) {
        accumulate_item<T, DT / 16>(G, acc.data(), v_head, vs.blk, vs.tok, table, len, BS, scores.data(), len);
        accumulated = true;
      }
#elif defined(TANDEM_AVX2_ONLY)
      if constexpr (std::is_same_v<T, at::BFloat16> && (DT == 64 || DT == 128)) {
        accumulate_item_avx2<T>(G, D, acc.data(), v_head, vs.blk, vs.tok, table, len, BS, scores.data(), len);
        accumulated = true;
      }
#endif
      if (!accumulated) {
        std::fill(acc.begin(), acc.end(), 0.f);
        prefetch_block(v_head + table[0] * vs.blk, vs.tok, std::min(BS, len), D);
      }
      for (int64_t i = 0; i < nblk && !accumulated; ++i) {
        const int64_t n = std::min(BS, len - i * BS);
        if (i + 1 < nblk) {
          const int64_t n_next = std::min(BS, len - (i + 1) * BS);
          prefetch_block(v_head + table[i + 1] * vs.blk, vs.tok, n_next, D);
        }
        int64_t stride;
        const float* rows = block_rows(v_head + table[i] * vs.blk, vs.tok, n, D, scratch.data(), stride);
        for (int64_t g = 0; g < G; ++g)
          accumulate_block<DT>(acc.data() + g * D, rows, stride, scores.data() + g * len + i * BS, n, D);
      }
      for (int64_t g = 0; g < G; ++g) store_row(acc.data() + g * D, out + (b * H + h0 + g) * D, D, inv_sum[g]);
    }
#if defined(TANDEM_HAVE_AMX)
    if (amx) _tile_release();
#endif
  });
}

template <typename T>
void dispatch_head_dim(const T* q, int64_t q_sb, int64_t q_sh, const T* k, Strides ks, const T* v, Strides vs,
                       const int64_t* block_table, int64_t bt_stride, const int64_t* lens, T* out, int64_t B,
                       int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale, bool use_amx) {
  switch (D) {
    case 64:
      return decode_attention<T, 64>(q, q_sb, q_sh, k, ks, v, vs, block_table, bt_stride, lens, out, B, H, KVH, D,
                                     BS, scale, use_amx);
    case 128:
      return decode_attention<T, 128>(q, q_sb, q_sh, k, ks, v, vs, block_table, bt_stride, lens, out, B, H, KVH, D,
                                      BS, scale, use_amx);
    default:
      return decode_attention<T, 0>(q, q_sb, q_sh, k, ks, v, vs, block_table, bt_stride, lens, out, B, H, KVH, D,
                                    BS, scale, use_amx);
  }
}

}  // namespace

at::Tensor paged_decode_attention(
    at::Tensor q,
    at::Tensor k_cache,
    at::Tensor v_cache,
    at::Tensor block_table,
    at::Tensor context_lens,
    double scale,
    bool use_amx,
    std::optional<at::Tensor> out_arg) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  block_table.device().is_cpu() && context_lens.device().is_cpu(),
              "paged_decode_attention: all tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "paged_decode_attention: k_cache must be [KVH, NB, BS, D], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "paged_decode_attention: v_cache shape ", v_cache.sizes(),
              " != k_cache shape ", k_cache.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "paged_decode_attention: q must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "paged_decode_attention: q, k_cache and v_cache must share a dtype, got ", dtype, ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode_attention: k_cache and v_cache must have stride 1 in their last dim");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 2,
              "paged_decode_attention: block_table must be a 2-d int64 tensor, got ", block_table.scalar_type(),
              " ", block_table.sizes());
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.dim() == 1,
              "paged_decode_attention: context_lens must be a 1-d int64 tensor, got ", context_lens.scalar_type(),
              " ", context_lens.sizes());

  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode_attention: head_dim of q (", D, ") != head_dim of the cache (",
              k_cache.size(3), ")");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_decode_attention: query heads (", H,
              ") must be a multiple of kv heads (", KVH, ")");
  TORCH_CHECK(BS > 0, "paged_decode_attention: block_size must be positive");
  TORCH_CHECK(block_table.size(0) == B, "paged_decode_attention: block_table has ", block_table.size(0),
              " rows for ", B, " sequences");
  TORCH_CHECK(context_lens.size(0) == B, "paged_decode_attention: context_lens has ", context_lens.size(0),
              " entries for ", B, " sequences");

  at::Tensor out;
  if (out_arg.has_value()) {
    out = *out_arg;
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype && out.sizes() == q.sizes() && out.is_contiguous(),
                "paged_decode_attention: out must be a contiguous CPU tensor shaped and typed like q ", q.sizes(), " ",
                dtype, ", got ", out.sizes(), " ", out.scalar_type());
  } else {
    out = at::empty({B, H, D}, q.options());
  }
  if (B == 0 || H == 0 || D == 0) return out;

  auto qc = q.stride(2) == 1 ? q : q.contiguous();
  auto table = block_table.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t max_blocks = table.size(1);
  const int64_t* table_p = table.data_ptr<int64_t>();
  const int64_t* lens_p = lens.data_ptr<int64_t>();

  // validate every block id that will be read, so a bad table raises instead of reading out of bounds
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens_p[b];
    TORCH_CHECK(len >= 1 && len <= max_blocks * BS, "paged_decode_attention: context_lens[", b, "] = ", len,
                " is outside [1, ", max_blocks * BS, "] (block_table width ", max_blocks, " x block_size ", BS, ")");
    const int64_t nblk = (len + BS - 1) / BS;
    for (int64_t i = 0; i < nblk; ++i) {
      const int64_t id = table_p[b * max_blocks + i];
      TORCH_CHECK(id >= 0 && id < NB, "paged_decode_attention: block_table[", b, ", ", i, "] = ", id,
                  " is outside the cache's ", NB, " blocks");
    }
  }

  const Strides ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const Strides vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const float fscale = static_cast<float>(scale);
  if (dtype == at::kFloat) {
    dispatch_head_dim<float>(qc.data_ptr<float>(), qc.stride(0), qc.stride(1), k_cache.data_ptr<float>(), ks,
                             v_cache.data_ptr<float>(), vs, table_p, max_blocks, lens_p, out.data_ptr<float>(), B, H,
                             KVH, D, BS, fscale, use_amx);
  } else {
    dispatch_head_dim<at::BFloat16>(qc.data_ptr<at::BFloat16>(), qc.stride(0), qc.stride(1),
                                    k_cache.data_ptr<at::BFloat16>(), ks, v_cache.data_ptr<at::BFloat16>(), vs,
                                    table_p, max_blocks, lens_p, out.data_ptr<at::BFloat16>(), B, H, KVH, D, BS,
                                    fscale, use_amx);
  }
  return out;
}

// k_cache[:, slot_blocks[t], slot_offsets[t]] = k[t] and the same for v: a step's new keys and values into
// the cache slots the scheduler gave them. k, v [T, KVH, D] with stride 1 along D (views of the fused qkv
// output); caches as for paged_decode_attention. Against torch's advanced-index assignment of the same
// (two index_put calls, each a TensorIterator over [KVH, T, D]): 62 -> a few us a layer at 64 tokens.
void write_kv_slots(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slot_blocks, const at::Tensor& slot_offsets) {
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  slot_blocks.device().is_cpu() && slot_offsets.device().is_cpu(),
              "write_kv_slots: all tensors must be on the CPU");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "write_kv_slots: k_cache and v_cache must be [KVH, NB, BS, D] of one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t KVH = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == KVH && k.size(2) == D && v.sizes() == k.sizes(),
              "write_kv_slots: k and v must be [T, ", KVH, ", ", D, "], got ", k.sizes(), " and ", v.sizes());
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "write_kv_slots: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "write_kv_slots: rows must have stride 1 along head_dim");
  const int64_t T = k.size(0);
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong &&
                  slot_blocks.dim() == 1 && slot_offsets.dim() == 1 && slot_blocks.size(0) == T &&
                  slot_offsets.size(0) == T,
              "write_kv_slots: slot_blocks and slot_offsets must be 1-d int64 of ", T, " entries");
  auto blocks = slot_blocks.contiguous();
  auto offsets = slot_offsets.contiguous();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(bp[t] >= 0 && bp[t] < NB && op[t] >= 0 && op[t] < BS, "write_kv_slots: slot ", t, " (block ", bp[t],
                ", offset ", op[t], ") is outside the cache's ", NB, " blocks of ", BS);
  const size_t row_bytes = static_cast<size_t>(D) * k.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size();
  // a decode step's few rows stay on this thread; a long prefill's split
  at::parallel_for(0, T, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t kdst = h * k_cache.stride(0) + bp[t] * k_cache.stride(1) + op[t] * k_cache.stride(2);
        const int64_t vdst = h * v_cache.stride(0) + bp[t] * v_cache.stride(1) + op[t] * v_cache.stride(2);
        std::memcpy(kc + kdst * es, kp + (t * k.stride(0) + h * k.stride(1)) * es, row_bytes);
        std::memcpy(vc + vdst * es, vp + (t * v.stride(0) + h * v.stride(1)) * es, row_bytes);
      }
  });
}

// Whether pass 1 runs on AMX tiles here: built for a CPU with AMX-BF16 and granted the tile registers.
bool amx_available() {
#if defined(TANDEM_HAVE_AMX)
  return amx_granted();
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (one query per sequence) reading K/V blocks in place",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_table"),
        pybind11::arg("context_lens"), pybind11::arg("scale"), pybind11::arg("use_amx") = true,
        pybind11::arg("out") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("write_kv_slots", &write_kv_slots, "Write a step's keys and values into their paged cache slots",
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("slot_blocks"), pybind11::arg("slot_offsets"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("amx_available", &amx_available, "Whether bf16 scores run on AMX tiles on this machine");
}
