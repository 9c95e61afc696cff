// y = x · Wᵀ (+ bias) in float32 on AVX-512, W packed once into 32-column panels.
//
//   pack_panels(w [N, K] float32)         -> panels [ceil(N / 32), K, 32]: W's rows 32 at a time, transposed,
//                                            the last panel zero-padded
//   panel_linear(x [M, K], panels, N, bias [N] or None) -> [M, N] float32
//
// Why: a decode step's matmuls have a few dozen rows, and oneDNN's fp32 matmul on its own packed weights
// splits those poorly over 2 threads: 125-190 GF/s at 64 rows on a Zen 4 (SmolLM2-135M's four weight
// shapes, 30 distinct weights each so that they stream from memory as in a step), against ~210 at 512
// rows and more. The kernel here ran the same shapes at 193-201 GF/s, and at 205-220 at 512-2,048 rows
// (oneDNN 203-218). In one engine, alternating (fp32, 2 threads, Zen 4): a 64-sequence decode step 183.3
// -> 163.7 ms median (155.2 -> 137.8 best), an 8,192-token prefill step 10.28 -> 10.12 s, a 2,048-token
// one 2.385 -> 2.393 s (a tie). The panels replace oneDNN's packed copy, so the weights' memory is the
// same (models/llama.py: Linear).
//
// Each thread takes a range of panels. Rows go in blocks of ~2 MB of x (a core's share of the last-level
// cache) so that a long prefill does not stream all of x from memory once per panel; in a block, 12 rows
// x 32 columns at a time are 24 vector accumulators kept in registers over all of K, fed by two panel
// loads and 12 broadcasts of x per k.
//
// Built by services/engine/cpu_kernels.py (-O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fopenmp).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kPanel = 32;    // columns of W (rows of the weight) per panel: two float vectors
constexpr int kRowTile = 12;      // rows of x per register tile: 12 x 2 accumulators of the 32 registers
constexpr int64_t kBlockBytes = 2 << 20;  // x rows per block: about this much of x (a core's share of L3)

void check(bool ok, const char* what) { TORCH_CHECK(ok, "panel_linear: ", what); }

at::Tensor pack_panels(const at::Tensor& w) {
  check(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), "w must be a 2-d float32 CPU tensor");
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), NB = (N + kPanel - 1) / kPanel;
  auto out = at::empty({NB, K, kPanel}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kPanel; ++j) {
          const int64_t n = nb * kPanel + j;
          dst[(nb * K + k) * kPanel + j] = n < N ? src[n * K + k] : 0.f;
        }
  });
  return out;
}

#if defined(__AVX512F__)
// MR rows of x against one panel over all of K; `cols` (<= 32) of the 32 results are stored, plus bias.
template <int MR>
__attribute__((noinline)) void row_tile(const float* __restrict x, int64_t K, const float* __restrict panel,
                                        float* __restrict y, int64_t ldy, int64_t cols, const float* __restrict bias) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, _mm512_add_ps(acc[r][0], b0));
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, _mm512_add_ps(acc[r][1], b1));
  }
}

using RowTileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, const float*);
constexpr RowTileFn kRowTiles[kRowTile + 1] = {nullptr,       row_tile<1>,  row_tile<2>, row_tile<3>, row_tile<4>,
                                               row_tile<5>,   row_tile<6>,  row_tile<7>, row_tile<8>, row_tile<9>,
                                               row_tile<10>,  row_tile<11>, row_tile<12>};
#endif

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t N, const std::optional<at::Tensor>& bias) {
#if defined(__AVX512F__)
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
        "x must be a contiguous 2-d float32 CPU tensor");
  check(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.is_contiguous() && panels.size(2) == kPanel,
        "panels must come from pack_panels");
  const int64_t M = x.size(0), K = x.size(1), NB = panels.size(0);
  check(panels.size(1) == K, "x's columns must match the weight's");
  check(N > (NB - 1) * kPanel && N <= NB * kPanel, "N must be the packed weight's row count");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    check(bias->dim() == 1 && bias->numel() == N && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
          "bias must be a contiguous float32 [N]");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t block = std::max<int64_t>(kRowTile, kBlockBytes / (K * 4) / kRowTile * kRowTile);
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = 0; mb < M; mb += block) {
      const int64_t m_end = std::min(M, mb + block);
      for (int64_t nb = b0; nb < b1; ++nb) {
        const int64_t cols = std::min(kPanel, N - nb * kPanel);
        for (int64_t m0 = mb; m0 < m_end; m0 += kRowTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowTile, m_end - m0));
          kRowTiles[rows](xp + m0 * K, K, wp + nb * K * kPanel, yp + m0 * N + nb * kPanel, N, cols,
                          bp ? bp + nb * kPanel : nullptr);
        }
      }
    }
  });
  return y;
#else
  (void)x, (void)panels, (void)N, (void)bias;
  check(false, "built without AVX-512");
  return at::Tensor();
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_panels", &pack_panels, "W [N, K] float32 -> 32-column panels [ceil(N/32), K, 32]", pybind11::arg("w"));
  m.def("panel_linear", &panel_linear, "x [M, K] . W^T (+ bias) from W's panels", pybind11::arg("x"),
        pybind11::arg("panels"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none());
#if defined(__AVX512F__)
  m.attr("available") = true;
#else
  m.attr("available") = false;
#endif
}
