// Paged decode attention on CPU: one query token per sequence, keys/values read in place from the
// paged KV cache (no gather copy).
//
//   q            [B, H, D]            float32 or bfloat16
//   k_cache      [KVH, NB, BS, D]     same dtype as q; any strides with stride(-1) == 1
//   v_cache      [KVH, NB, BS, D]     same shape / dtype as k_cache
//   block_table  [B, MAXBLK] int64    block ids of each sequence, in order (entries past the context are ignored)
//   context_lens [B] int64            tokens in each sequence's context (1 .. MAXBLK * BS)
//   returns      [B, H, D]            softmax(q K^T * scale) V, in q's dtype
//
// GQA: query head h reads kv head h / (H / KVH). Work is split over (sequence, kv head) pairs; each pair
// handles all of its group's query heads together so every K/V row is loaded (and, for bf16, converted
// to float) once. Softmax is two-pass over a float32 score buffer: scores for the whole context, then
// max / exp / sum, then the weighted sum of V rows. Everything accumulates in float32. (A one-pass online
// softmax measured slower here: per-block max/exp/rescale costs more than re-walking the block table.)
// Each block's rows are prefetched while the previous block is processed.
//
// Built by services/engine/cpu_kernels.py with -O3 -march=native -ffp-contract=fast -fopenmp
// (at::parallel_for is header-inlined OpenMP; without -fopenmp it would silently run on one thread).

// Narrow includes instead of <torch/extension.h>: the same pybind/ATen pieces, a third of the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "exp_nonpos.h"
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// The hot loops live in small non-inlined functions: inlined into the OpenMP-outlined parallel_for body,
// gcc 12 left some of them scalar (the exp loop) or spilled their accumulators to the stack every row.
#define NOINLINE __attribute__((noinline))

// bit casts the vectoriser can see through (a memcpy into a local counts as a memory op and can block it)
inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }

// bf16 -> float32 is exact: the bf16 bits are the top half of the float's
inline const float* as_float_row(const at::BFloat16* src, float* __restrict scratch, int64_t n) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = bits_to_float(static_cast<uint32_t>(s[i]) << 16);
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

// Lanes of the partial dot products below: one native float vector.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
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

#if defined(__AVX512BF16__)
// The bf16 scores without widening K: vdpbf16ps multiplies bf16 pairs exactly and accumulates in float32,
// 32 elements an instruction, straight from the cache's rows (D % 32 == 0). Widening each K row to float
// first (the generic path) cost as much as the dot products; with it gone, pass 1 reads K once, at
// memory speed. q is the bf16 query row itself.
constexpr bool kHaveBf16Dot = true;
NOINLINE void score_block_bf16(float* __restrict s, const at::BFloat16* q, const at::BFloat16* rows, int64_t stride,
                               int64_t n, int64_t D, float scale) {
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

// Touch every cache line of a block's first n rows one block ahead of use: blocks sit at random places in
// the cache, so the hardware prefetcher cannot see the next one coming.
template <typename T>
inline void prefetch_block(const T* blk, int64_t row_stride, int64_t n, int64_t D) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < n; ++t) {
    const char* r = reinterpret_cast<const char*>(blk + t * row_stride);
    for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(r + c, 0, 3);
  }
}

struct Strides {
  int64_t h, blk, tok;  // kv head, block, token (elements); the head_dim stride is 1
};

template <typename T, int DT>
void decode_attention(
    const T* q, int64_t q_sb, int64_t q_sh,  // q [B, H, D] strides (last is 1)
    const T* k, Strides ks, const T* v, Strides vs,
    const int64_t* block_table, int64_t bt_stride,
    const int64_t* lens,
    T* out,  // [B, H, D] contiguous
    int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale) {
  const int64_t G = H / KVH;
  const bool q_sh_contiguous = true;  // q rows have stride 1 along D (checked by the caller)
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    int64_t max_len = 0;
    for (int64_t item = begin; item < end; ++item) max_len = std::max(max_len, lens[item / KVH]);
    std::vector<float> scores(static_cast<size_t>(G * max_len));  // [G, len] per item
    std::vector<float> qf(static_cast<size_t>(G * D));
    std::vector<float> acc(static_cast<size_t>(G * D));
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : static_cast<size_t>(BS * D));
    std::vector<float> inv_sum(static_cast<size_t>(G));

    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH;
      const int64_t kvh = item % KVH;
      const int64_t len = lens[b];
      const int64_t nblk = (len + BS - 1) / BS;
      const int64_t* table = block_table + b * bt_stride;
      const int64_t h0 = kvh * G;
      const T* k_head = k + kvh * ks.h;
      const T* v_head = v + kvh * vs.h;
      for (int64_t g = 0; g < G; ++g) load_q_row(q + b * q_sb + (h0 + g) * q_sh, qf.data() + g * D, D);

      // pass 1: scores[g, pos] = (q_g . k_pos) * scale
      for (int64_t i = 0; i < nblk; ++i) {
        const int64_t n = std::min(BS, len - i * BS);
        if (i + 1 < nblk) {
          const int64_t n_next = std::min(BS, len - (i + 1) * BS);
          prefetch_block(k_head + table[i + 1] * ks.blk, ks.tok, n_next, D);
          // V's rows too, so pass 2 finds them in cache instead of waiting on a second random walk
          prefetch_block(v_head + table[i + 1] * vs.blk, vs.tok, n_next, D);
        }
        if constexpr (std::is_same_v<T, at::BFloat16> && kHaveBf16Dot) {
          if (D % 32 == 0 && q_sh_contiguous) {
            for (int64_t g = 0; g < G; ++g)
              score_block_bf16(scores.data() + g * len + i * BS, q + b * q_sb + (h0 + g) * q_sh,
                               k_head + table[i] * ks.blk, ks.tok, n, D, scale);
            continue;
          }
        }
        int64_t stride;
        const float* rows = block_rows(k_head + table[i] * ks.blk, ks.tok, n, D, scratch.data(), stride);
        for (int64_t g = 0; g < G; ++g)
          score_block<DT>(scores.data() + g * len + i * BS, qf.data() + g * D, rows, stride, n, D, scale);
      }
      // softmax numerators and denominators
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * len;
        inv_sum[g] = 1.f / exp_sum(s, len, max_of(s, len));
      }
      // pass 2: acc[g] = sum_pos p[g, pos] * v_pos
      std::fill(acc.begin(), acc.end(), 0.f);
      prefetch_block(v_head + table[0] * vs.blk, vs.tok, std::min(BS, len), D);
      for (int64_t i = 0; i < nblk; ++i) {
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
  });
}

template <typename T>
void dispatch_head_dim(const T* q, int64_t q_sb, int64_t q_sh, const T* k, Strides ks, const T* v, Strides vs,
                       const int64_t* block_table, int64_t bt_stride, const int64_t* lens, T* out, int64_t B,
                       int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale) {
  switch (D) {
    case 64:
      return decode_attention<T, 64>(q, q_sb, q_sh, k, ks, v, vs, block_table, bt_stride, lens, out, B, H, KVH, D,
                                     BS, scale);
    case 128:
      return decode_attention<T, 128>(q, q_sb, q_sh, k, ks, v, vs, block_table, bt_stride, lens, out, B, H, KVH, D,
                                      BS, scale);
    default:
      return decode_attention<T, 0>(q, q_sb, q_sh, k, ks, v, vs, block_table, bt_stride, lens, out, B, H, KVH, D,
                                    BS, scale);
  }
}

}  // namespace

at::Tensor paged_decode_attention(
    at::Tensor q,
    at::Tensor k_cache,
    at::Tensor v_cache,
    at::Tensor block_table,
    at::Tensor context_lens,
    double scale) {
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

  auto out = at::empty({B, H, D}, q.options());
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
                             KVH, D, BS, fscale);
  } else {
    dispatch_head_dim<at::BFloat16>(qc.data_ptr<at::BFloat16>(), qc.stride(0), qc.stride(1),
                                    k_cache.data_ptr<at::BFloat16>(), ks, v_cache.data_ptr<at::BFloat16>(), vs,
                                    table_p, max_blocks, lens_p, out.data_ptr<at::BFloat16>(), B, H, KVH, D, BS,
                                    fscale);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (one query per sequence) reading K/V blocks in place",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_table"),
        pybind11::arg("context_lens"), pybind11::arg("scale"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
