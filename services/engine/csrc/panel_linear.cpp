// y = x · Wᵀ (+ bias), float32 or bf16, on AVX-512 or AVX2, W packed once into panels of two vectors' width.
//
//   pack_panels(w [N, K] float32 or bf16) -> panels [ceil(N / P), K, P]: W's rows P at a time, transposed,
//                                            the last panel zero-padded; P = panel_width (32 AVX-512, 16 AVX2);
//                                            bf16 panels as k pairs where bf16_dot (an odd K padded by a
//                                            zero k-row, seen only in the stride)
//   panel_linear(x [M, K], panels, N, bias [N] or None) -> [M, N] of x's dtype
//   pack_swiglu_panels(w [2 I, K]) -> panels [2 ceil(I / P), K, P]: the gate's (rows 0..I-1) and the up
//                                            projection's (rows I..2I-1) panels in turn, gate panel p then up panel p
//   panel_swiglu(x [M, K], swiglu panels, I) -> [M, I] = silu(x Gᵀ) * (x Uᵀ): a SwiGLU MLP's bf16 gate/up
//                                            matmul with silu-and-mul as its epilogue (builds with AVX512-BF16's
//                                            dot instruction: `swiglu`)
//
// Why: a decode step's matmuls have a few dozen rows, and oneDNN's fp32 matmul on its own packed weights
// splits those poorly over 2 threads: 125-190 GF/s at 64 rows on a Zen 4 (SmolLM2-135M's four weight
// shapes, 30 distinct weights each so that they stream from memory as in a step), against ~210 at 512
// rows and more. The kernel here ran the same shapes at 193-201 GF/s, and at 205-220 at 512-2,048 rows
// (oneDNN 203-218). In one engine, alternating (fp32, 2 threads, Zen 4): a 64-sequence decode step 183.3
// -> 163.7 ms median (155.2 -> 137.8 best), an 8,192-token prefill step 10.28 -> 10.12 s, a 2,048-token
// one 2.385 -> 2.393 s (a tie). On a Zen 3 (AVX2 only), the same way: a 64-sequence decode step 267.1 ->
// 239.1 ms median, prefill steps of 2,048 tokens 4.21 -> 3.86 s and of 8,192 16.16 -> 15.00 s. The panels
// replace oneDNN's packed copy, so the weights' memory is the same (models/llama.py: Linear).
//
// fp32 tiles prefetch the next panel while they run, each row tile a share of its lines spread over its k
// loop: at a decode step's few dozen rows a panel is used by only a few tiles, and the first of them used
// to wait on memory for all of it (a panel is one 64-byte line a k). On the Zen 3, the same packed weights
// through the kernel before and after, alternating: 16 rows 32.4 -> 24.1 ms per 120 weights, 64 rows
// 88.9 -> 81.3, 1-2 and 256-2,048 rows level; a 64-sequence fp32 decode step 187.2 -> 176.1 ms median
// and a 16-sequence one 66.2 -> 54.2. bf16 panels (half the bytes) measured 2% slower with it.
//
// With AVX512-BF16, bf16 panels hold k pairs and tiles multiply bf16 x by them with vdpbf16ps, two
// multiply-adds a float32 lane per instruction and no widening of x or W. Against oneDNN's packed bf16 matmul
// on SmolLM2-135M's shapes (2 cores of a Zen 4, alternating, `python -m benchmarks.linear_kernels`): 1 row
// 30 against 19 GF/s, 16 rows 352 against 225, 64 rows 423 against 352, 512 rows 429 against 415, 2,048
// rows 387 against 393. In one engine, alternating steps: a 64-sequence bf16 decode step 104.1 -> 93.1 ms
// median, a 16-sequence one 36.9 -> 29.9, batch-1 level (12.2), a 2,048-token prefill step level (1.34 s).
//
// Each thread takes a range of panels. Rows go in blocks of ~2 MB of x (a core's share of the last-level
// cache) so that a long prefill does not stream all of x from memory once per panel; in a block, a tile
// of rows x panels is kept in registers over all of K. With AVX-512 a thread takes its panels two at a time
// in tiles of 6 rows (in blocks of kPairMinRows rows or more): 24 accumulators fed, per k, by four panel
// loads and six broadcasts of x; a panel left over, or a block of fewer rows, goes in tiles of 12 rows x
// one panel, the same 24 accumulators fed by two panel loads and twelve broadcasts. AVX2 has one-panel
// tiles of 6 rows (12 of its 16 registers). Ten loads for 24 multiply-adds instead of fourteen: on an
// Ice Lake Xeon (AVX-512, 2 cores) the fp32 matmuls of SmolLM2-135M's shapes went, median GF/s, 191 ->
// 226 at 64 rows, 227 -> 276 at 128, 231 -> 283 at 512 and 244 -> 296 at 2,048, where MKL's sgemm ran
// 148, 217, 253 and 301 (`python -m
// benchmarks.linear_kernels`, old and new kernels alternating); bf16 panels widened to fp32 (no
// AVX512-BF16 there) 191 -> 219 at 2,048 rows and level at 64. One core alone, everything in L1,
// 12 x 1 against 6 x 2 panels measured 126-134 against 152 GF/s at best.
//
// Built by services/engine/cpu_kernels.py (-O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fopenmp).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define TANDEM_PANELS 1
#include <immintrin.h>
#endif
// bf16 panels hold k pairs, multiplied by vdpbf16ps (bf16 x, no widening). Not where the CPU has AMX: there
// oneDNN runs bf16 matmuls on its tiles, far past what vdpbf16ps can, and bf16 weights stay with oneDNN.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(__AMX_BF16__)
#define TANDEM_BF16_DOT 1
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "silu_mul.h"
#include "simd.h"

namespace {

// The register tile the widest ISA the build has allows (its float vector, vfloat, is simd.h's). simd.h's
// `widen_bf16` turns one vector of 2 x kLanes bf16 weights, stored as pairs (column j, column j + kLanes)
// in each 32-bit lane, into the two float vectors of columns 0..kLanes-1 and kLanes..2 kLanes-1: a bf16 is
// the top half of its float, so a shift left by 16 and a mask of the top half are exact conversions, two
// instructions a k.
#if defined(__AVX512F__)
constexpr int kRowTile = 12;  // rows of x per register tile on one panel: 12 x 2 accumulators of the 32 registers
// rows per register tile on two panels at once: 6 x 4 accumulators, four panel loads and six broadcasts of x
// a k where the one-panel tile has two and twelve (see run)
constexpr int kPairRowTile = 6;
// Below this many rows in a block, one-panel tiles: 12 rows take one pass over each panel where 6-row
// tiles take two, and with few rows the panels' reads, not the multiply-adds, set the pace. On a Zen 4
// (2 cores, SmolLM2-135M's shapes, one- and two-panel builds alternating) two-panel tiles took 1.25x
// the time at 8 rows, 1.22x at 12, 1.12x at 16 and 1.08x at 18, were level at 1-6 and 14, and won from
// 20 rows (0.945) up: 0.93-0.96 at 24-256, 0.98 at 2,048.
constexpr int64_t kPairMinRows = 20;
#elif defined(TANDEM_PANELS)
constexpr int kRowTile = 6;  // 6 x 2 accumulators, two panel loads and a broadcast: 15 of the 16 registers
constexpr int kPairRowTile = 1;  // none: a two-panel tile of even 3 rows would need 17 of the 16
constexpr int64_t kPairMinRows = 0;
#else
constexpr int kLanes = 16;  // the layout only: panel_linear refuses to run without AVX2/AVX-512
constexpr int kRowTile = 1;
#endif

constexpr int64_t kPanel = 2 * kLanes;  // columns of W (rows of the weight) per panel: two vectors
constexpr int64_t kBlockBytes = 2 << 20;      // x rows per block: about this much of x (a core's share of L3)
// Outputs at least this large are written with non-temporal stores: they go past the last-level cache
// anyway, and a plain store first reads each line it fills. Alternating in one engine on a Zen 4 (old and
// new kernel on the same panels), median: fp32 prefill steps of 8,192 tokens 9.50 -> 9.17 s and of 2,048
// 2.41 -> 2.32 s (its 25 MB gate/up output), bf16 8,192 tokens 4.93 -> 4.81 s (qkv and gate/up outputs
// of 16-25 MB); the bf16 matmuls alone at 4,096 rows 416 -> 428 GF/s. Decode steps' outputs are far
// smaller and stay cached for the next op, which reads them at once.
constexpr int64_t kStreamBytes = 16 << 20;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "panel_linear: ", what); }


// bf16 panels with the dot instruction (TANDEM_BF16_DOT): each k-row pair (k, k + 1) of a panel is kPanel
// 32-bit lanes, column j's two weights in lane j, the operand order of vdpbf16ps; an odd K is padded with a
// zero k-row. Else float panels in order, and bf16 panels as lane pairs (j, j + kLanes) per k-row, the
// order widen_bf16 reads.
template <typename W>
constexpr bool k_pairs() {
#if defined(TANDEM_BF16_DOT)
  return !std::is_same_v<W, float>;
#else
  return false;
#endif
}

// k-rows a panel holds for a weight of K columns
template <typename W>
constexpr int64_t panel_k(int64_t K) {
  return k_pairs<W>() ? K + (K & 1) : K;
}

// the same for a weight of `dtype` (float32 or bf16)
inline int64_t panel_k(at::ScalarType dtype, int64_t K) {
  return dtype == at::kFloat ? panel_k<float>(K) : panel_k<uint16_t>(K);
}

// where W[n = panel's first + j, k] sits in its panel
template <typename W>
constexpr int64_t panel_offset(int64_t k, int64_t j) {
  if constexpr (k_pairs<W>()) return (k & ~int64_t{1}) * kPanel + 2 * j + (k & 1);
  if constexpr (std::is_same_v<W, float>) return k * kPanel + j;
  return k * kPanel + (j < kLanes ? 2 * j : 2 * (j - kLanes) + 1);
}

// W's panels, each `dst_stride` elements after the one before (KP x kPanel: one after the other)
template <typename W>
void pack_into(const W* __restrict src, W* __restrict dst, int64_t N, int64_t K, int64_t dst_stride) {
  const int64_t NB = (N + kPanel - 1) / kPanel, KP = panel_k<W>(K);
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      W* __restrict panel = dst + nb * dst_stride;
      std::fill(panel, panel + KP * kPanel, W(0));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kPanel && nb * kPanel + j < N; ++j)
          panel[panel_offset<W>(k, j)] = src[(nb * kPanel + j) * K + k];
    }
  });
}

// `parts` consecutive groups of N rows of w packed into panels, the groups' panels in turn: [p of group 0,
// p of group 1, ..., p + 1 of group 0, ...]; one group is pack_panels, two the SwiGLU layout
at::Tensor pack_groups(const at::Tensor& w, int64_t parts) {
  check(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && w.device().is_cpu(),
        "w must be a 2-d float32 or bfloat16 CPU tensor");
  check(w.size(0) % parts == 0 && w.size(0) > 0, "w's rows must split into the gate's and the up projection's halves");
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0) / parts, K = wc.size(1), NB = (N + kPanel - 1) / kPanel;
  const int64_t KP = panel_k(wc.scalar_type(), K);
  auto storage = at::empty({parts * NB, KP, kPanel}, wc.options());
  // [parts x NB, K, kPanel] whatever the padding: a padded k-row shows only in the panels' stride, so that K
  // is still checked against x's columns exactly
  auto out = storage.as_strided({parts * NB, K, kPanel}, {KP * kPanel, kPanel, 1});
  for (int64_t g = 0; g < parts; ++g) {
    if (wc.scalar_type() == at::kFloat) {
      pack_into(wc.data_ptr<float>() + g * N * K, out.data_ptr<float>() + g * KP * kPanel, N, K, parts * KP * kPanel);
    } else {
      pack_into(reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()) + g * N * K,
                reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + g * KP * kPanel, N, K, parts * KP * kPanel);
    }
  }
  return out;
}

at::Tensor pack_panels(const at::Tensor& w) { return pack_groups(w, 1); }

at::Tensor pack_swiglu_panels(const at::Tensor& w) { return pack_groups(w, 2); }

#if defined(TANDEM_PANELS)
// A tile's MR x kPanel float32 sums plus the panel's zero-padded float32 bias, `cols` (<= kPanel) of them
// stored as Y (float32 or bf16): the last panel's, and bf16 rows without AVX512-BF16, through a small buffer;
// whole rows with non-temporal stores where `stream` (y's rows then aligned to 64 bytes).
template <int MR, typename Y>
inline void store_tile(const vfloat (&acc)[MR][2], Y* __restrict y, int64_t ldy, int64_t cols,
                       const float* __restrict bias, bool stream) {
  const auto b0 = bias ? vloadu(bias) : vzero();
  const auto b1 = bias ? vloadu(bias + kLanes) : vzero();
  for (int r = 0; r < MR; ++r) {
    if (std::is_same_v<Y, float> && cols == kPanel) {
      auto* out = reinterpret_cast<float*>(y + r * ldy);
      if (stream) {
        vstream(out, vadd(acc[r][0], b0));
        vstream(out + kLanes, vadd(acc[r][1], b1));
      } else {
        vstoreu(out, vadd(acc[r][0], b0));
        vstoreu(out + kLanes, vadd(acc[r][1], b1));
      }
      continue;
    }
#if defined(TANDEM_BF16_DOT)
    if (!std::is_same_v<Y, float> && cols == kPanel) {  // one instruction rounds both vectors to nearest even
      const __m512bh out = _mm512_cvtne2ps_pbh(vadd(acc[r][1], b1), vadd(acc[r][0], b0));
      if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(y + r * ldy), (__m512i)out);
      else _mm512_storeu_si512(y + r * ldy, (__m512i)out);
      continue;
    }
#endif
    alignas(64) float tail[kPanel];
    vstoreu(tail, vadd(acc[r][0], b0));
    vstoreu(tail + kLanes, vadd(acc[r][1], b1));
    if constexpr (std::is_same_v<Y, float>) {
      std::memcpy(y + r * ldy, tail, cols * sizeof(float));
    } else {
      Y* __restrict out = y + r * ldy;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) out[j] = float_to_bf16_bits(tail[j]);
    }
  }
}

#if defined(TANDEM_BF16_DOT)
// v rounded to bf16 as store_tile stores it (the same instruction: nearest even), widened back (exact): what
// the separate silu_and_mul would read
inline void stored_as_bf16(vfloat v, float* __restrict out) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  vstoreu(out, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

// A bf16 SwiGLU tile's epilogue: the gate's and the up projection's MR x kPanel sums as the separate matmul
// would have stored them, silu(gate) * up by silu_mul.h's arithmetic, `cols` of them stored: the bits of
// panel_linear followed by silu_and_mul, without writing and reading back the [M, 2 I] product.
template <int MR>
inline void store_swiglu_tile(const vfloat (&gate)[MR][2], const vfloat (&up)[MR][2], uint16_t* __restrict y, int64_t ldy,
                              int64_t cols, bool stream) {
  // the whole tile in one span: 2 MR independent vectors in flight, where a row at a time left silu's
  // chain of dependent operations (exp's polynomial, a division) waiting on latency (fp32, 64 rows: the
  // fused matmul 10% slower than the separate pair, against ~1% faster with the tile at once)
  alignas(64) float g[MR * kPanel], u[MR * kPanel], o[MR * kPanel];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h) {
      stored_as_bf16(gate[r][h], g + r * kPanel + h * kLanes);
      stored_as_bf16(up[r][h], u + r * kPanel + h * kLanes);
    }
  silu_times_span<true>(g, u, o, MR * kPanel);
  vfloat out[MR][2];
  for (int r = 0; r < MR; ++r) {
    out[r][0] = vloadu(o + r * kPanel);
    out[r][1] = vloadu(o + r * kPanel + kLanes);
  }
  store_tile<MR>(out, y, ldy, cols, nullptr, stream);
}
#endif

// MR rows of x (float32) against NP consecutive panels of W (float32 or bf16) over all of K, plus their
// zero-padded float32 bias; `cols` (<= NP x kPanel, all but the last panel whole) of the results are stored
// as Y (float32 or bf16), the last panel's and every bf16 row through a small buffer.
template <int MR, int NP, typename W, typename Y>
__attribute__((noinline)) void row_tile(const float* __restrict x, int64_t K, const W* __restrict panel,
                                        Y* __restrict y, int64_t ldy, int64_t cols, const float* __restrict bias,
                                        const char* pf, int64_t pf_lines, bool stream) {
  vfloat acc[NP][MR][2];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < MR; ++r) acc[p][r][0] = acc[p][r][1] = vzero();
  const int64_t pstride = panel_k<W>(K) * kPanel;
  const auto step = [&](int64_t k) __attribute__((always_inline)) {
    vfloat w[NP][2];
    for (int p = 0; p < NP; ++p) {
      if constexpr (std::is_same_v<W, float>) {
        w[p][0] = vloadu(panel + p * pstride + k * kPanel);
        w[p][1] = vloadu(panel + p * pstride + k * kPanel + kLanes);
      } else {
        widen_bf16(panel + p * pstride + k * kPanel, w[p][0], w[p][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      const auto xv = vset1(x[r * K + k]);
      for (int p = 0; p < NP; ++p) {
        acc[p][r][0] = vfma(xv, w[p][0], acc[p][r][0]);
        acc[p][r][1] = vfma(xv, w[p][1], acc[p][r][1]);
      }
    }
  };
  if (pf_lines <= 0) {
    for (int64_t k = 0; k < K; ++k) step(k);
  } else {  // one prefetch of the next panel's lines every `every` k: this tile's share arrives spread out
    const int64_t every = std::max<int64_t>(1, K / pf_lines);
    const char* pf_end = pf + 64 * pf_lines;
    for (int64_t k0 = 0; k0 < K; k0 += every) {
      if (pf < pf_end) {
        __builtin_prefetch(pf, 0, 2);
        pf += 64;
      }
      const int64_t k1 = std::min(K, k0 + every);
      for (int64_t k = k0; k < k1; ++k) step(k);
    }
    for (; pf < pf_end; pf += 64) __builtin_prefetch(pf, 0, 2);  // a share larger than K
  }
  for (int p = 0; p < NP; ++p)
    store_tile<MR>(acc[p], y + p * kPanel, ldy, std::min(kPanel, cols - p * kPanel), bias ? bias + p * kPanel : nullptr, stream);
}

#if defined(TANDEM_BF16_DOT)
// MR rows of bf16 x against one k-pair bf16 panel over all of K: per k pair, two panel loads and per row
// one broadcast of x's pair, each vdpbf16ps two multiply-adds a lane into float32 sums. The unused
// prefetch arguments keep the fp32 tile's signature. kSwiGLU: two panels, a gate panel and its up panel
// (store_swiglu_tile), in tiles of up to kPairRowTile rows: 24 accumulators, four panel loads a k pair.
template <int MR, bool kSwiGLU = false>
__attribute__((noinline)) void row_tile_dot(const uint16_t* __restrict x, int64_t K, const uint16_t* __restrict panel,
                                            uint16_t* __restrict y, int64_t ldy, int64_t cols,
                                            const float* __restrict bias, const char*, int64_t, bool stream) {
  constexpr int NP = kSwiGLU ? 2 : 1;
  const int64_t pstride = panel_k<uint16_t>(K) * kPanel;
  __m512 acc[NP][MR][2];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < MR; ++r) acc[p][r][0] = acc[p][r][1] = _mm512_setzero_ps();
  const auto step = [&](int64_t k, auto x_pair) __attribute__((always_inline)) {
    __m512bh w[NP][2];
    for (int p = 0; p < NP; ++p) {
      w[p][0] = (__m512bh)_mm512_loadu_si512(panel + p * pstride + k * kPanel);
      w[p][1] = (__m512bh)_mm512_loadu_si512(panel + p * pstride + k * kPanel + kPanel);
    }
    for (int r = 0; r < MR; ++r) {
      const auto xv = (__m512bh)_mm512_set1_epi32(x_pair(x + r * K + k));
      for (int p = 0; p < NP; ++p) {
        acc[p][r][0] = _mm512_dpbf16_ps(acc[p][r][0], xv, w[p][0]);
        acc[p][r][1] = _mm512_dpbf16_ps(acc[p][r][1], xv, w[p][1]);
      }
    }
  };
  const int64_t K2 = K & ~int64_t{1};
  for (int64_t k = 0; k < K2; k += 2)
    step(k, [](const uint16_t* p) {
      int32_t v;
      std::memcpy(&v, p, sizeof(v));
      return v;
    });
  if (K & 1)  // the last k alone, against the panel's zero k-row
    step(K2, [](const uint16_t* p) { return static_cast<int32_t>(*p); });
  if constexpr (kSwiGLU) store_swiglu_tile<MR>(acc[0], acc[1], y, ldy, cols, stream);
  else store_tile<MR>(acc[0], y, ldy, cols, bias, stream);
}
#endif

// The row tiles for x of type X and W (= y's type), indexed by rows 1..kRowTile: x as float32 against float
// or lane-pair bf16 panels, or bf16 x against k-pair panels.
template <typename X, typename W, int... MR>
constexpr auto row_tiles(std::integer_sequence<int, MR...>) {
  using RowTileFn = void (*)(const X*, int64_t, const W*, W*, int64_t, int64_t, const float*, const char*, int64_t, bool);
#if defined(TANDEM_BF16_DOT)
  if constexpr (!std::is_same_v<X, float>) return std::array<RowTileFn, sizeof...(MR) + 1>{nullptr, row_tile_dot<MR + 1>...};
  else
#endif
    return std::array<RowTileFn, sizeof...(MR) + 1>{nullptr, row_tile<MR + 1, 1, W, W>...};
}

// The two-panel row tiles (float32 x against float or lane-pair bf16 panels), indexed by rows 1..kPairRowTile.
template <typename W, int... MR>
constexpr auto pair_row_tiles(std::integer_sequence<int, MR...>) {
  using RowTileFn = void (*)(const float*, int64_t, const W*, W*, int64_t, int64_t, const float*, const char*, int64_t, bool);
  return std::array<RowTileFn, sizeof...(MR) + 1>{nullptr, row_tile<MR + 1, 2, W, W>...};
}

// y = x W^T (+ bias) with W and y of one element type (float, or uint16_t for bf16), x as X: float32, or
// bf16 for the k-pair panels.
template <typename X, typename W>
void run(const X* xp, int64_t M, int64_t K, const W* wp, int64_t NB, int64_t N, const float* bp, W* yp) {
  const int64_t KP = panel_k<W>(K);  // k-rows a panel
  const int64_t panel_lines = KP * kPanel * static_cast<int64_t>(sizeof(W)) / 64;  // 64-byte lines a panel
  static constexpr auto tiles = row_tiles<X, W>(std::make_integer_sequence<int, kRowTile>{});
  static constexpr auto pair_tiles = pair_row_tiles<W>(std::make_integer_sequence<int, kPairRowTile>{});
  const int64_t x_row_bytes = K * static_cast<int64_t>(sizeof(X));
  const int64_t block = std::max<int64_t>(kRowTile, kBlockBytes / x_row_bytes / kRowTile * kRowTile);
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(W));
  const bool stream = M * row_bytes >= kStreamBytes && row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(yp) % 64 == 0;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = 0; mb < M; mb += block) {
      const int64_t m_end = std::min(M, mb + block);
      // panels in the tiles that start at panel n: two while this thread has two left (with AVX-512, not
      // for the bf16 dot tiles, and for blocks of kPairMinRows rows or more), else one
      const bool pairs = kPairRowTile > 1 && std::is_same_v<X, float> && m_end - mb >= kPairMinRows;
      const auto tile_panels = [&](int64_t n) -> int64_t { return (pairs && n + 1 < b1) ? 2 : 1; };
      for (int64_t nb = b0; nb < b1;) {
        const int64_t np = tile_panels(nb);
        const int64_t rt = np == 2 ? kPairRowTile : kRowTile;
        const int64_t nt = (m_end - mb + rt - 1) / rt;
        const int64_t cols = std::min(np * kPanel, N - nb * kPanel);
        // the panels this thread reads next, prefetched a share per row tile (fp32 only: bf16 panels, half
        // the bytes for the same multiply-adds, measured 2% slower with it at 64 rows)
        const int64_t np_next = nb + np < b1 ? tile_panels(nb + np) : 0;
        const bool has_next = std::is_same_v<W, float> && np_next > 0 && nt > 1;
        const int64_t next_lines = has_next ? np_next * panel_lines : 0;
        const char* next = reinterpret_cast<const char*>(wp + (nb + np) * KP * kPanel);
        int64_t t = 0;
        for (int64_t m0 = mb; m0 < m_end; m0 += rt, ++t) {
          const int rows = static_cast<int>(std::min<int64_t>(rt, m_end - m0));
          const int64_t l0 = t * next_lines / nt, l1 = (t + 1) * next_lines / nt;
          auto* const tile = [&] {
            if constexpr (std::is_same_v<X, float>) return np == 2 ? pair_tiles[rows] : tiles[rows];
            else return tiles[rows];
          }();
          tile(xp + m0 * K, K, wp + nb * KP * kPanel, yp + m0 * N + nb * kPanel, N, cols, bp ? bp + nb * kPanel : nullptr,
               next + 64 * l0, l1 - l0, stream);
        }
        nb += np;
      }
    }
    if (stream) _mm_sfence();  // this thread's non-temporal stores visible before the caller reads y
  });
}

#if defined(TANDEM_BF16_DOT)
// The bf16 SwiGLU matmul with its silu-and-mul epilogue, only where the dot instruction runs bf16 tiles: on a
// Zen 4 (2 cores, SmolLM2-135M, fused and separate alternating step by step in one engine) a 2,048-token bf16
// prefill step took 0.977-0.992x the time (median of 8), decode steps of 16 and 64 sequences level. fp32 gained
// nothing measurable (decode at 16 and 64 sequences 1.01x, prefill 0.985-1.016x): silu's arithmetic, the
// same in the epilogue, is most of the separate pass's cost, and the MLP's row chunks keep the product cached.
#define TANDEM_SWIGLU 1

// y [M, I] = silu(x Gᵀ) * (x Uᵀ) from pack_swiglu_panels' NPAIRS (gate, up) panel pairs: as run, with each
// thread taking a range of pairs and every tile one pair (two panels, in tiles of up to kPairRowTile rows).
template <int... MR>
constexpr auto swiglu_row_tiles(std::integer_sequence<int, MR...>) {
  using RowTileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, uint16_t*, int64_t, int64_t, const float*, const char*, int64_t, bool);
  return std::array<RowTileFn, sizeof...(MR) + 1>{nullptr, row_tile_dot<MR + 1, true>...};
}

void run_swiglu(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t NPAIRS, int64_t I, uint16_t* yp) {
  static constexpr auto tiles = swiglu_row_tiles(std::make_integer_sequence<int, kPairRowTile>{});
  const int64_t KP = panel_k<uint16_t>(K);
  const int64_t block = std::max<int64_t>(kPairRowTile, kBlockBytes / (K * 2) / kPairRowTile * kPairRowTile);
  const int64_t row_bytes = I * 2;
  const bool stream = M * row_bytes >= kStreamBytes && row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(yp) % 64 == 0;
  at::parallel_for(0, NPAIRS, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t mb = 0; mb < M; mb += block) {
      const int64_t m_end = std::min(M, mb + block);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t cols = std::min(kPanel, I - q * kPanel);
        for (int64_t m0 = mb; m0 < m_end; m0 += kPairRowTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kPairRowTile, m_end - m0));
          tiles[rows](xp + m0 * K, K, wp + 2 * q * KP * kPanel, yp + m0 * I + q * kPanel, I, cols, nullptr, nullptr, 0, stream);
        }
      }
    }
    if (stream) _mm_sfence();
  });
}
#endif
#endif

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t N, const std::optional<at::Tensor>& bias) {
#if defined(TANDEM_PANELS)
  const auto dtype = x.scalar_type();
  check(x.dim() == 2 && (dtype == at::kFloat || dtype == at::kBFloat16) && x.is_contiguous() && x.device().is_cpu(),
        "x must be a contiguous 2-d float32 or bfloat16 CPU tensor");
  check(panels.dim() == 3 && panels.scalar_type() == dtype && panels.size(2) == kPanel,
        "panels must come from pack_panels, of x's dtype");
  const int64_t M = x.size(0), K = x.size(1), NB = panels.size(0);
  check(panels.size(1) == K, "x's columns must match the weight's");
  const int64_t KP = panel_k(dtype, K);
  check(panels.stride(2) == 1 && panels.stride(1) == kPanel && (NB == 1 || panels.stride(0) == KP * kPanel),
        "panels must come from pack_panels (its layout, unsliced)");
  check(N > (NB - 1) * kPanel && N <= NB * kPanel, "N must be the packed weight's row count");
  at::Tensor padded_bias;  // float32, zero-padded to whole panels, so that every tile loads whole vectors
  if (bias.has_value() && bias->defined()) {
    check(bias->dim() == 1 && bias->numel() == N && bias->scalar_type() == dtype && bias->is_contiguous(),
          "bias must be a contiguous [N] of x's dtype");
    padded_bias = at::zeros({NB * kPanel}, bias->options().dtype(at::kFloat));
    float* pb = padded_bias.data_ptr<float>();
    if (dtype == at::kFloat) {
      std::memcpy(pb, bias->data_ptr<float>(), N * sizeof(float));
    } else {
      const auto* src = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
      for (int64_t n = 0; n < N; ++n) pb[n] = bf16_bits_to_float(src[n]);
    }
  }
  const float* bp = padded_bias.defined() ? padded_bias.data_ptr<float>() : nullptr;
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  pybind11::gil_scoped_release no_gil;
  if (dtype == at::kFloat) {
    run(x.data_ptr<float>(), M, K, panels.data_ptr<float>(), NB, N, bp, y.data_ptr<float>());
  } else {
    const auto* wb = reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>());
    auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
#if defined(TANDEM_BF16_DOT)
    run(xb, M, K, wb, NB, N, bp, yb);
#else
    // x widened once: M x K conversions against M x N x K multiply-adds
    std::vector<float> xf(M * K);
#pragma omp simd
    for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_bits_to_float(xb[i]);
    run(xf.data(), M, K, wb, NB, N, bp, yb);
#endif
  }
  return y;
#else
  (void)x, (void)panels, (void)N, (void)bias;
  check(false, "built without AVX2 or AVX-512");
  return at::Tensor();
#endif
}

at::Tensor panel_swiglu(const at::Tensor& x, const at::Tensor& panels, int64_t I) {
#if defined(TANDEM_SWIGLU)
  check(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
        "x must be a contiguous 2-d bfloat16 CPU tensor (the fused SwiGLU matmul is bf16 only)");
  check(panels.dim() == 3 && panels.scalar_type() == at::kBFloat16 && panels.size(2) == kPanel,
        "panels must come from pack_swiglu_panels, of x's dtype");
  const int64_t M = x.size(0), K = x.size(1), NB = panels.size(0), KP = panel_k<uint16_t>(K);
  check(panels.size(1) == K, "x's columns must match the weight's");
  check(panels.stride(2) == 1 && panels.stride(1) == kPanel && panels.stride(0) == KP * kPanel,
        "panels must come from pack_swiglu_panels (its layout, unsliced)");
  check(NB % 2 == 0 && I > (NB / 2 - 1) * kPanel && I <= NB / 2 * kPanel,
        "I must be half the packed weight's row count (panels from pack_swiglu_panels)");
  auto y = at::empty({M, I}, x.options());
  if (M == 0) return y;
  pybind11::gil_scoped_release no_gil;
  run_swiglu(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K,
             reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>()), NB / 2, I,
             reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
#else
  (void)x, (void)panels, (void)I;
  check(false, "panel_swiglu needs a build with AVX512-BF16's dot instruction (module attribute `swiglu`)");
  return at::Tensor();
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_panels", &pack_panels, "W [N, K] float32 or bfloat16 -> panels [ceil(N/width), K, width]",
        pybind11::arg("w"));
  m.def("panel_linear", &panel_linear, "x [M, K] . W^T (+ bias) from W's panels", pybind11::arg("x"),
        pybind11::arg("panels"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none());
  m.def("pack_swiglu_panels", &pack_swiglu_panels,
        "W [2 I, K] (gate rows, then up rows) -> panels [2 ceil(I/width), K, width], gate and up panels in turn",
        pybind11::arg("w"));
  m.def("panel_swiglu", &panel_swiglu, "silu(x . Gᵀ) * (x . Uᵀ) from pack_swiglu_panels' panels", pybind11::arg("x"),
        pybind11::arg("panels"), pybind11::arg("i"));
#if defined(TANDEM_SWIGLU)
  m.attr("swiglu") = true;
#else
  m.attr("swiglu") = false;
#endif
  m.attr("panel_width") = kPanel;  // 32 with AVX-512, 16 with AVX2
#if defined(TANDEM_BF16_DOT)
  m.attr("bf16_dot") = true;  // bf16 panels hold k pairs (an odd K padded by one k-row) for vdpbf16ps
#else
  m.attr("bf16_dot") = false;
#endif
// With AMX, oneDNN runs bf16 matmuls on its tiles and bf16 weights stay with it. Without AMX or
// AVX512-BF16, oneDNN still accepts bf16 on AVX-512 but emulates it: on an Ice Lake Xeon (2 threads,
// SmolLM2-135M, 64 sequences) its bf16 decode step took 387 ms against 175 on the widening panels here.
#if defined(__AMX_BF16__)
  m.attr("amx_bf16") = true;
#else
  m.attr("amx_bf16") = false;
#endif
#if defined(TANDEM_PANELS)
  m.attr("available") = true;
#else
  m.attr("available") = false;
#endif
}
