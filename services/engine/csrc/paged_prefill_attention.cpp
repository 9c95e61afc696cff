// Paged prefill attention on CPU, bfloat16 and float32 on AVX-512 or AVX2: causal attention of each
// prefill chunk's queries over its whole context (cached prefix + the chunk), keys/values read from the
// paged KV cache.
//
//   q             [T, H, D]          bfloat16 or float32, stride(2) == 1 (a view of the fused qkv projection is fine)
//   k_cache       [KVH, NB, BS, D]   q's dtype, stride(3) == 1, this step's keys already written
//   v_cache       [KVH, NB, BS, D]   same shape / dtype as k_cache
//   query_starts  [P] int64          first row of each chunk in q / out
//   query_lens    [P] int64          the chunk's tokens (>= 1)
//   context_lens  [P] int64          cached + chunk tokens; the chunk's tokens are the context's last ones
//   block_tables  [P, MAXBLK] int64  each sequence's block ids, in order
//   scale         float
//   out           [T, H, D]          q's dtype, contiguous; rows outside the chunks are not touched
//
// Why: torch's SDPA (the flash kernel for CPU) ran these at ~60 GFLOP/s on the served shapes (256-token
// chunks, head_dim 64, 3 KV heads for 9 query heads), a quarter of a prefill step. Here the products run
// on vdpbf16ps (two bf16 products per float lane and instruction, float32 accumulation):
//
// 1. pack: each (KV head, 16-key tile) of every chunk's context is copied once per call into the layouts
//    the dot products want — keys as [D/2][16 keys] pairs of dims, so that one vector load feeds 16 keys'
//    scores; values as [8 key pairs][D] pairs of keys, so that one load feeds 16 output dims for two
//    keys. Keys past the context are zero (finite: a masked weight of 0 times them stays 0).
// 2. attend: work items are (chunk, KV head, 16 query tokens), handed out longest first from a shared
//    counter (causal items differ in cost by up to the context length over 16). All of a KV head's
//    query heads (GQA) share its packed tiles.
//    Each item's rows (16 tokens x the KV head's query heads) are scored a block of 64 keys at a time in
//    register tiles of 6 rows x 64 keys (24 independent accumulator chains), the block staying in L1
//    across the rows; then an exact softmax per row over a per-thread score buffer; then weights . V a
//    block at a time, 6 rows' accumulators (3 at D = 128) in registers.
//    - float32 words: fp32, and bf16 where the CPU has no AVX512-BF16 (an Ice Lake),
//      whose packed tiles and query rows are widened to float32 (exact) and whose outputs are rounded to
//      bf16. Before, an online softmax kept 4 rows' outputs in registers while scoring, so its q.k
//      products ran as 4 FMA chains, one FMA a cycle where the core issues two. Ice Lake Xeon, 2 threads,
//      alternating call by call (python -m benchmarks.prefill_attention --dtype float32): 32 chunks of
//      256 tokens (9 / 3 heads of 64) 31.9 -> 21.5 ms a layer, one chunk of 4,096 211 -> 116 (SDPA 160),
//      2 chunks of 1,024 with 32 / 8 heads of 128 305 -> 150; bf16 widened, 32 x 256, 36.7 -> 24.2.
//    - bf16 words on vdpbf16ps: the same phases, each instruction two products a lane
//      (dim pairs in the scores, key pairs in P.V). The weights are rounded to bf16 before the P.V
//      products (as torch's flash kernel does for bf16) and the row sums add the rounded weights, so
//      each output is a true weighted mean of the value rows. Against the online softmax this replaced
//      (Zen 4, 2 threads, old and new alternating call by call): 8 chunks of 256 tokens 3.47 -> 3.19 ms
//      a layer, 32 x 256 14.0 -> 12.0, 2 x 1,024 9.3 -> 8.8, one chunk of 4,096 67.0 -> 64.3, and with
//      32 / 8 heads of 128, 2 x 1,024 75.0 -> 54.6. On that Zen 4 the widened float32 path ran bf16 at
//      1.3-1.6x this one's time.
//    - AVX2 (a Zen 3, no AVX-512): the same code over 8-lane vectors (the vector layer below), float32
//      words only: score register tiles of 6 rows x one 16-key tile (two vectors, 12 accumulators),
//      weights . V 32 dims a pass for 3 rows at a time. SDPA ran these before. Zen 3, 2 threads, against
//      SDPA call by call (python -m benchmarks.prefill_attention): fp32 8 chunks of 256 tokens 7.5 against
//      12.4 ms a layer, 32 x 256 28.1 / 56.5, one chunk of 2,048 47.5 / 54.6, 2 x 1,024 with 32 / 8 heads
//      of 128 175 / 226; bf16 (widened) 8 x 256 6.0 / 12.9.
//
// Built by services/engine/cpu_kernels.py with -O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fopenmp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define TANDEM_PREFILL_KERNEL 1
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "simd.h"

namespace {

#if defined(TANDEM_PREFILL_KERNEL)

constexpr int kKeyTile = 16;    // keys per packed tile
constexpr int kTokenTile = 16;  // query tokens per work item

constexpr int kKeyVecs = kKeyTile / kLanes;  // vectors across a tile's keys: 1 on AVX-512, 2 on AVX2

// exp(x) for x <= 0: exp_nonpos.h's Cephes reduction and polynomial, on vectors
inline vfloat exp_nonpos_v(vfloat x) {
  x = vmax(x, vset1(-87.3f));
  const vfloat round = vset1(12582912.0f);
  const vfloat n = vsub(vfma(x, vset1(1.44269504088896341f), round), round);
  vfloat r = vfnma(n, vset1(0.693359375f), x);
  r = vfnma(n, vset1(-2.12194440e-4f), r);
  vfloat p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.0f)));
  return vmul(p, pow2i(n));
}

// 64-byte aligned storage for the float32 path's buffers (aligned vector loads and stores)
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAllocator&) const { return true; }
  bool operator!=(const AlignedAllocator&) const { return false; }
};

struct Chunk {
  int64_t query_start, query_len, context_len;
  int64_t first_tile;  // index of its context's first tile in the packed buffers
  int64_t num_tiles;
};

// Packed tiles hold 32-bit words: for bf16 a pair of bf16 values, for float32 one float.
//   bf16:    keys [D/2][16]: (k[2j], k[2j+1]) of 16 keys;  values [8][D]: (v0[d], v1[d]) of 8 key pairs
//   float32: keys [D][16]:   k[d] of 16 keys;               values [16][D]: the 16 key rows as they are
// bf16 without AVX512-BF16 (an Ice Lake) takes float32's layouts and FMAs: the packed tiles and the
// query rows are widened to float32 (exact), and only the outputs are rounded to bf16.
#if defined(__AVX512BF16__)
constexpr bool kWidenBf16 = false;
#else
constexpr bool kWidenBf16 = true;
#endif
template <typename T>
constexpr bool kFloatWords = std::is_same_v<T, float> || kWidenBf16;
template <typename T>
constexpr bool kWidened = kFloatWords<T> && !std::is_same_v<T, float>;  // bf16 on float32 words
template <typename T>
using Word = std::conditional_t<kFloatWords<T>, float, uint32_t>;
template <typename W>
constexpr int kPerWord = std::is_same_v<W, float> ? 1 : 2;  // values per word
template <typename T, int D>
constexpr int64_t kKeyWords = (D / kPerWord<Word<T>>) * kKeyTile;  // words per packed key tile
template <typename T, int D>
constexpr int64_t kValueWords = (kKeyTile / kPerWord<Word<T>>) * D;

template <typename T, int D>
void pack_tile(const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* table, int64_t block_size,
               int64_t g, int64_t tile, int64_t context_len, Word<T>* __restrict kdst, Word<T>* __restrict vdst) {
  using E = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;  // one cache element
  const auto* kbase = reinterpret_cast<const E*>(k_cache.data_ptr<T>());
  const auto* vbase = reinterpret_cast<const E*>(v_cache.data_ptr<T>());
  const int64_t s0 = k_cache.stride(0), s1 = k_cache.stride(1), s2 = k_cache.stride(2);
  const int64_t t0 = v_cache.stride(0), t1 = v_cache.stride(1), t2 = v_cache.stride(2);
  static const E zeros[D] = {};
  const E* krow[kKeyTile];
  const E* vrow[kKeyTile];
  for (int j = 0; j < kKeyTile; ++j) {
    const int64_t key = tile * kKeyTile + j;
    if (key < context_len) {
      const int64_t block = table[key / block_size], off = key % block_size;
      krow[j] = kbase + g * s0 + block * s1 + off * s2;
      vrow[j] = vbase + g * t0 + block * t1 + off * t2;
    } else {
      krow[j] = vrow[j] = zeros;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    for (int j = 0; j < kKeyTile; ++j)
      for (int d = 0; d < D; ++d) kdst[d * kKeyTile + j] = krow[j][d];
    for (int j = 0; j < kKeyTile; ++j) std::memcpy(vdst + j * D, vrow[j], D * sizeof(float));
  } else if constexpr (kWidened<T>) {  // a bf16 is a float's top half
    for (int j = 0; j < kKeyTile; ++j)
      for (int d = 0; d < D; ++d) kdst[d * kKeyTile + j] = bf16_bits_to_float(krow[j][d]);
    for (int j = 0; j < kKeyTile; ++j)
#pragma omp simd
      for (int d = 0; d < D; ++d) vdst[j * D + d] = bf16_bits_to_float(vrow[j][d]);
  } else {
    for (int j = 0; j < kKeyTile; ++j) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(krow[j]);  // dims in pairs
      for (int dp = 0; dp < D / 2; ++dp) kdst[dp * kKeyTile + j] = src[dp];
    }
    for (int kp = 0; kp < kKeyTile / 2; ++kp) {
      const uint16_t* __restrict a = vrow[2 * kp];
      const uint16_t* __restrict b = vrow[2 * kp + 1];
      uint32_t* __restrict dst = vdst + kp * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) dst[d] = static_cast<uint32_t>(a[d]) | (static_cast<uint32_t>(b[d]) << 16);
    }
  }
}

// ---- attend: scores, softmax, values, on float32 words (fp32, and bf16 widened where the CPU has no
// AVX512-BF16) or bf16 words (dim or key pairs, two products a lane per vdpbf16ps) ----

// acc + a . b, lane by lane: a multiply-add on float words, two (vdpbf16ps) on bf16 pair words
template <typename W>
inline __attribute__((always_inline)) vfloat mul_add(vfloat acc, vfloat a, vfloat b) {
  if constexpr (std::is_same_v<W, float>) {
    return vfma(a, b, acc);
  } else {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    (void)a, (void)b;
    return acc;  // never instantiated: bf16 words exist only with AVX512-BF16
#endif
  }
}

template <typename W>
inline __attribute__((always_inline)) vfloat broadcast(W w) {
  if constexpr (std::is_same_v<W, float>) return vset1(w);
  else return vset1(__builtin_bit_cast(float, w));  // the pair's 32 bits in every lane
}

// Raw scores q . k of RG rows (q [RG][D / kPerWord] words) against KT packed key tiles ([D / kPerWord][16
// keys] each, kKeyVecs vectors a word): RG x KT x kKeyVecs accumulators, per word one load per vector and
// one broadcast per row (24 chains at 6 x 4 tiles on AVX-512, 12 at 6 x 1 tile of two vectors on AVX2)
template <typename W, int D, int RG, int KT>
inline __attribute__((always_inline)) void score_tiles(const W* q, const W* kt, float* sc, int64_t sc_stride) {
  constexpr int QW = D / kPerWord<W>;
  constexpr int KV = KT * kKeyVecs;  // vector i holds keys [i * kLanes, (i + 1) * kLanes) of the block
  vfloat s[RG][KV];
  for (int r = 0; r < RG; ++r)
    for (int i = 0; i < KV; ++i) s[r][i] = vzero();
  for (int d = 0; d < QW; ++d) {
    vfloat k[KV];
    for (int i = 0; i < KV; ++i)
      k[i] = vloadu(reinterpret_cast<const float*>(kt + (i / kKeyVecs) * kKeyTile * QW + d * kKeyTile + (i % kKeyVecs) * kLanes));
    for (int r = 0; r < RG; ++r) {
      const vfloat qv = broadcast(q[r * QW + d]);
      for (int i = 0; i < KV; ++i) s[r][i] = mul_add<W>(s[r][i], k[i], qv);
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int i = 0; i < KV; ++i) vstore(sc + r * sc_stride + i * kLanes, s[r][i]);
}

// key tiles one register tile holds: a whole block on AVX-512; one tile on AVX2, whose 16 registers hold
// 6 rows x 2 vectors of accumulators, the 2 key vectors and a broadcast
constexpr int kRegTiles = kLanes == 16 ? 4 : 1;

// the scores of all nr rows against one block of KT tiles, 6 rows a register tile
template <typename W, int D, int KT>
__attribute__((noinline)) void score_block(int nr, const W* q, const W* kt, float* sc, int64_t sc_stride) {
  constexpr int QW = D / kPerWord<W>;
  if constexpr (KT > kRegTiles) {  // more tiles than a register tile holds: a register tile's worth at a time
    score_block<W, D, kRegTiles>(nr, q, kt, sc, sc_stride);
    score_block<W, D, KT - kRegTiles>(nr, q, kt + kRegTiles * kKeyTile * QW, sc + kRegTiles * kKeyTile, sc_stride);
    return;
  } else {
    int r0 = 0;
    for (; r0 + 6 <= nr; r0 += 6) score_tiles<W, D, 6, KT>(q + r0 * QW, kt, sc + r0 * sc_stride, sc_stride);
    switch (nr - r0) {
      case 5: score_tiles<W, D, 5, KT>(q + r0 * QW, kt, sc + r0 * sc_stride, sc_stride); break;
      case 4: score_tiles<W, D, 4, KT>(q + r0 * QW, kt, sc + r0 * sc_stride, sc_stride); break;
      case 3: score_tiles<W, D, 3, KT>(q + r0 * QW, kt, sc + r0 * sc_stride, sc_stride); break;
      case 2: score_tiles<W, D, 2, KT>(q + r0 * QW, kt, sc + r0 * sc_stride, sc_stride); break;
      case 1: score_tiles<W, D, 1, KT>(q + r0 * QW, kt, sc + r0 * sc_stride, sc_stride); break;
      default: break;
    }
  }
}

// acc[PR][CC vectors] += weights[PR][0..n) . values[0..n)[CC vectors], n in words: float weights against
// value rows, or weight pairs against the packed [key pair][D] words. `values` and `accm` point at the
// pass's first dim; rows are D apart in both.
template <typename W, int D, int PR, int CC>
inline __attribute__((always_inline)) void weigh_values(const W* w, int64_t w_stride, const W* values, int64_t n, float* accm) {
  vfloat acc[PR][CC];
  for (int r = 0; r < PR; ++r)
    for (int c = 0; c < CC; ++c) acc[r][c] = vload(accm + r * D + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    vfloat wv[PR];
    for (int r = 0; r < PR; ++r) wv[r] = broadcast(w[r * w_stride + j]);
    for (int c = 0; c < CC; ++c) {
      const vfloat v = vloadu(reinterpret_cast<const float*>(values + j * D + c * kLanes));
      for (int r = 0; r < PR; ++r) acc[r][c] = mul_add<W>(acc[r][c], v, wv[r]);
    }
  }
  for (int r = 0; r < PR; ++r)
    for (int c = 0; c < CC; ++c) vstore(accm + r * D + c * kLanes, acc[r][c]);
}

// weigh_values over all nr rows: on AVX-512 all of D a pass, 24 accumulators (6 rows at D = 64, 3 at
// 128); on AVX2 32 dims a pass, 3 rows x 4 vectors (12 accumulators, 3 broadcasts and a value vector fill
// its 16 registers)
template <typename W, int D>
__attribute__((noinline)) void weigh_block(int nr, const W* w, int64_t w_stride, const W* values, int64_t n, float* accm) {
  constexpr int CC = kLanes == 16 ? D / 16 : 4;  // vectors of D a pass
  constexpr int PR = (kLanes == 16 ? 24 : 12) / CC;
  for (int c0 = 0; c0 < D; c0 += CC * kLanes) {
    const W* vals = values + c0;
    float* acc = accm + c0;
    int r0 = 0;
    for (; r0 + PR <= nr; r0 += PR) weigh_values<W, D, PR, CC>(w + r0 * w_stride, w_stride, vals, n, acc + r0 * D);
    switch (nr - r0) {
      case 5: if constexpr (PR > 5) weigh_values<W, D, 5, CC>(w + r0 * w_stride, w_stride, vals, n, acc + r0 * D); break;
      case 4: if constexpr (PR > 4) weigh_values<W, D, 4, CC>(w + r0 * w_stride, w_stride, vals, n, acc + r0 * D); break;
      case 3: if constexpr (PR > 3) weigh_values<W, D, 3, CC>(w + r0 * w_stride, w_stride, vals, n, acc + r0 * D); break;
      case 2: if constexpr (PR > 2) weigh_values<W, D, 2, CC>(w + r0 * w_stride, w_stride, vals, n, acc + r0 * D); break;
      case 1: weigh_values<W, D, 1, CC>(w + r0 * w_stride, w_stride, vals, n, acc + r0 * D); break;
      default: break;
    }
  }
}

// softmax(scale * s) over the row's first `visible` of n scores, zero past them, written as weight words
// to w [n / kPerWord] (float words: over the scores, in place); returns 1 / the weights' sum. bf16 words
// hold the weights rounded to bf16 pairs (key 2j, key 2j + 1), and the sum adds the rounded weights, so
// that each output is a true weighted mean of the value rows (torch's flash kernel rounds them too)
template <typename W>
inline float softmax_row(float* row, int64_t n, int64_t visible, float scale, W* w) {
  const vfloat neg_inf = vset1(-INFINITY);
  vfloat m = neg_inf;
  for (int64_t j = 0; j < n; j += kLanes) m = vmax(m, first_lanes(vload(row + j), visible - j, neg_inf));
  const vfloat row_max = vset1(hmax(m));
  const vfloat vscale = vset1(scale);
  vfloat sum = vzero();
  for (int64_t j = 0; j < n; j += kLanes) {
    const vfloat p = first_lanes(exp_nonpos_v(vmul(vsub(vload(row + j), row_max), vscale)), visible - j, vzero());
    if constexpr (std::is_same_v<W, float>) {
      vstore(w + j, p);
      sum = vadd(sum, p);
    } else {
#if defined(__AVX512BF16__)
      const __m256i pb = (__m256i)_mm512_cvtneps_pbh(p);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w + j / 2), pb);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pb), 16)));
#endif  // bf16 words exist only with AVX512-BF16
    }
  }
  return 1.f / hsum(sum);
}

constexpr int kBlockTiles = 4;  // key tiles a block: 64 keys, 16 KiB of keys or values at D = 64

// One item's rows (queries as words, q [rows][D / kPerWord]) over key tiles [0, num_tiles): scores of
// every row a block of keys at a time (the block stays in L1 across the rows), exact softmax per row into
// weight words (wb [rows][n / kPerWord]; float words reuse the scores), then the values a block at a time
// into accumulators in memory (acc [rows][D]).
template <typename W, int D>
void attend_item(int64_t rows, const W* q, const int64_t* limit, const W* keys, const W* values, int64_t num_tiles, float scale,
                 float* sc, W* wb, float* acc, float* inv) {
  constexpr int P = kPerWord<W>;
  const int64_t n = num_tiles * kKeyTile;
  const int nr = static_cast<int>(rows);
  for (int64_t t = 0; t < num_tiles; t += kBlockTiles) {
    const W* kt = keys + t * kKeyTile * (D / P);
    float* s = sc + t * kKeyTile;
    switch (std::min<int64_t>(kBlockTiles, num_tiles - t)) {
      case 4: score_block<W, D, 4>(nr, q, kt, s, n); break;
      case 3: score_block<W, D, 3>(nr, q, kt, s, n); break;
      case 2: score_block<W, D, 2>(nr, q, kt, s, n); break;
      default: score_block<W, D, 1>(nr, q, kt, s, n); break;
    }
  }
  W* const weights = [&] {
    if constexpr (std::is_same_v<W, float>) return sc;
    else return wb;
  }();
  for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_row<W>(sc + r * n, n, limit[r] + 1, scale, weights + r * (n / P));
  std::fill(acc, acc + rows * D, 0.f);
  for (int64_t t = 0; t < num_tiles; t += kBlockTiles) {
    const int64_t words = std::min<int64_t>(kBlockTiles, num_tiles - t) * kKeyTile / P;
    weigh_block<W, D>(nr, weights + t * kKeyTile / P, n / P, values + t * kKeyTile / P * D, words, acc);
  }
}

template <typename T, int D>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::vector<Chunk>& chunks,
         const at::Tensor& block_tables, double scale, at::Tensor& out) {
  const int64_t H = q.size(1), KVH = k_cache.size(0), G = H / KVH, BS = k_cache.size(2);
  int64_t tiles = 0;
  for (const auto& c : chunks) tiles += c.num_tiles;
  // uninitialised: pack_tile writes every element (a std::vector would zero ~1.5 MB a layer first)
  const std::unique_ptr<Word<T>[]> kbuf(new Word<T>[KVH * tiles * kKeyWords<T, D>]);
  const std::unique_ptr<Word<T>[]> vbuf(new Word<T>[KVH * tiles * kValueWords<T, D>]);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t table_stride = block_tables.stride(0);

  // 1. pack every (KV head, tile) once
  std::vector<std::pair<int64_t, int64_t>> tile_owner;  // global tile -> (chunk, tile within it)
  tile_owner.reserve(tiles);
  for (int64_t p = 0; p < static_cast<int64_t>(chunks.size()); ++p)
    for (int64_t t = 0; t < chunks[p].num_tiles; ++t) tile_owner.emplace_back(p, t);
  at::parallel_for(0, KVH * tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / tiles, global = i % tiles;
      const auto [p, t] = tile_owner[global];
      pack_tile<T, D>(k_cache, v_cache, tables + p * table_stride, BS, g, t, chunks[p].context_len,
                      kbuf.get() + (g * tiles + global) * kKeyWords<T, D>,
                      vbuf.get() + (g * tiles + global) * kValueWords<T, D>);
    }
  });

  // 2. attend: (chunk, KV head, token tile) items, most keys first
  struct Item { int64_t chunk, g, token0, cost; };
  std::vector<Item> items;
  for (int64_t p = 0; p < static_cast<int64_t>(chunks.size()); ++p) {
    const Chunk& c = chunks[p];
    const int64_t first_pos = c.context_len - c.query_len;
    for (int64_t i0 = 0; i0 < c.query_len; i0 += kTokenTile) {
      const int64_t last = first_pos + std::min(i0 + kTokenTile, c.query_len) - 1;
      for (int64_t g = 0; g < KVH; ++g) items.push_back({p, g, i0, (last / kKeyTile + 1) * std::min<int64_t>(kTokenTile, c.query_len - i0)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const auto* qbase = q.data_ptr<T>();
  auto* obase = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t n_items = static_cast<int64_t>(items.size());
  int64_t max_tiles = 0;
  for (const auto& c : chunks) max_tiles = std::max(max_tiles, c.num_tiles);
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // an item's query rows as words, scores (float32 words: then the weights), bf16 weight pairs (bf16
    // words), accumulators, 1 / sums and key limits
    using W = Word<T>;
    constexpr int P = kPerWord<W>;
    const int64_t item_rows = kTokenTile * G;
    std::vector<W, AlignedAllocator<W>> qw(static_cast<size_t>(item_rows * D / P));
    std::vector<float, AlignedAllocator<float>> sc(static_cast<size_t>(item_rows * max_tiles * kKeyTile));
    std::vector<W, AlignedAllocator<W>> wb(static_cast<size_t>(kFloatWords<T> ? 0 : item_rows * max_tiles * kKeyTile / P));
    std::vector<float, AlignedAllocator<float>> acc(static_cast<size_t>(item_rows * D));
    std::vector<float> inv(static_cast<size_t>(item_rows));
    std::vector<int64_t> limit(static_cast<size_t>(item_rows));
    for (int64_t k = next.fetch_add(1); k < n_items; k = next.fetch_add(1)) {
      const Item& it = items[k];
      const Chunk& c = chunks[it.chunk];
      const int64_t first_pos = c.context_len - c.query_len;
      const int64_t tokens = std::min<int64_t>(kTokenTile, c.query_len - it.token0);
      const W* keys = kbuf.get() + (it.g * tiles + c.first_tile) * kKeyWords<T, D>;
      const W* values = vbuf.get() + (it.g * tiles + c.first_tile) * kValueWords<T, D>;
      const int64_t rows = tokens * G;  // token-major: neighbouring rows are one token's heads
      const auto q_row = [&](int64_t r) { return qbase + (c.query_start + it.token0 + r / G) * qs0 + (it.g * G + r % G) * qs1; };
      const auto out_row = [&](int64_t r) { return obase + (c.query_start + it.token0 + r / G) * os0 + (it.g * G + r % G) * os1; };
      for (int64_t r = 0; r < rows; ++r) {
        if constexpr (kWidened<T>) {
          const auto* bits = reinterpret_cast<const uint16_t*>(q_row(r));
          for (int d = 0; d < D; ++d) qw[r * D + d] = bf16_bits_to_float(bits[d]);
        } else {
          std::memcpy(qw.data() + r * (D / P), q_row(r), D * sizeof(T));  // floats, or bf16 dims in pairs
        }
        limit[r] = first_pos + it.token0 + r / G;
      }
      const int64_t num_tiles = limit[rows - 1] / kKeyTile + 1;
      attend_item<W, D>(rows, qw.data(), limit.data(), keys, values, num_tiles, static_cast<float>(scale), sc.data(), wb.data(),
                        acc.data(), inv.data());
      for (int64_t r = 0; r < rows; ++r) {
        const vfloat vinv = vset1(inv[r]);
        for (int cc = 0; cc < D / kLanes; ++cc) {
          const vfloat o = vmul(vload(acc.data() + r * D + cc * kLanes), vinv);
          if constexpr (std::is_same_v<T, float>)
            vstoreu(reinterpret_cast<float*>(out_row(r)) + cc * kLanes, o);
          else
            store_bf16(reinterpret_cast<uint16_t*>(out_row(r)) + cc * kLanes, o);
        }
      }
    }
  });
}

#endif  // TANDEM_PREFILL_KERNEL

void check(bool ok, const char* what) { TORCH_CHECK(ok, "paged_prefill_attention: ", what); }

// the dtypes this build runs: both on any AVX-512 or AVX2 CPU (bf16 on AVX512-BF16's dot products where it
// has them, else widened to float32)
std::vector<std::string> built_dtypes() {
  std::vector<std::string> dtypes;
#if defined(TANDEM_PREFILL_KERNEL)
  dtypes.push_back("bfloat16");
  dtypes.push_back("float32");
#endif
  return dtypes;
}

void paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& query_starts, const at::Tensor& query_lens, const at::Tensor& context_lens,
                             const at::Tensor& block_tables, double scale, at::Tensor out) {
#if defined(TANDEM_PREFILL_KERNEL)
  check(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "q [T, H, D], caches [KVH, NB, BS, D]");
  const auto dtype = q.scalar_type();
  check(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && out.scalar_type() == dtype,
        "q, the caches and out must share one dtype");
  check(dtype == at::kBFloat16 || dtype == at::kFloat, "bfloat16 or float32 only");
  check(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && out.stride(2) == 1, "the last dim must be contiguous");
  check(out.sizes() == q.sizes(), "out must have q's shape");
  const int64_t H = q.size(1), D = q.size(2), KVH = k_cache.size(0);
  check(k_cache.size(3) == D && KVH > 0 && H % KVH == 0, "head_dim must match and H must be a multiple of KVH");
  check(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.stride(1) == 1, "block_tables [P, MAXBLK] int64");
  const int64_t P = query_starts.numel();
  check(query_lens.numel() == P && context_lens.numel() == P && block_tables.size(0) == P, "one start, length, context and table per chunk");
  const auto qs = query_starts.contiguous(), ql = query_lens.contiguous(), cl = context_lens.contiguous();
  const int64_t *qsp = qs.data_ptr<int64_t>(), *qlp = ql.data_ptr<int64_t>(), *clp = cl.data_ptr<int64_t>();
  std::vector<Chunk> chunks;
  int64_t first_tile = 0;
  for (int64_t p = 0; p < P; ++p) {
    check(qlp[p] >= 1 && clp[p] >= qlp[p] && qsp[p] >= 0 && qsp[p] + qlp[p] <= q.size(0), "a chunk out of range");
    check((clp[p] + k_cache.size(2) - 1) / k_cache.size(2) <= block_tables.size(1), "a block table shorter than its context");
    const int64_t* table = block_tables.data_ptr<int64_t>() + p * block_tables.stride(0);
    for (int64_t b = 0; b < (clp[p] + k_cache.size(2) - 1) / k_cache.size(2); ++b)
      check(table[b] >= 0 && table[b] < k_cache.size(1), "a block id outside the cache");
    const int64_t n_tiles = (clp[p] + kKeyTile - 1) / kKeyTile;
    chunks.push_back({qsp[p], qlp[p], clp[p], first_tile, n_tiles});
    first_tile += n_tiles;
  }
  if (chunks.empty()) return;
  check(D == 64 || D == 128, "head_dim must be 64 or 128");
  const bool f32 = dtype == at::kFloat;
  if (D == 64) {
    if (f32) return run<float, 64>(q, k_cache, v_cache, chunks, block_tables, scale, out);
    return run<at::BFloat16, 64>(q, k_cache, v_cache, chunks, block_tables, scale, out);
  } else {
    if (f32) return run<float, 128>(q, k_cache, v_cache, chunks, block_tables, scale, out);
    return run<at::BFloat16, 128>(q, k_cache, v_cache, chunks, block_tables, scale, out);
  }
#else
  check(false, "built without AVX2 or AVX-512");
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_prefill_attention", &paged_prefill_attention, "causal attention of prefill chunks over their paged context",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("query_starts"),
        pybind11::arg("query_lens"), pybind11::arg("context_lens"), pybind11::arg("block_tables"), pybind11::arg("scale"),
        pybind11::arg("out"),
        // the worker's event loop shares the process with the engine thread: a long prefill (a second
        // a layer for a long prompt) must not stop it from streaming other requests' tokens
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("dtypes") = built_dtypes();  // torch dtype names this build runs
  m.attr("available") = !built_dtypes().empty();
  m.attr("head_dims") = std::vector<int64_t>{64, 128};
}
