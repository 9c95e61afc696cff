// exp(x) for x <= 0, written so a loop of it vectorises: Cephes expf range reduction plus a degree-6
// polynomial, ~1-2 ulp over the range. Inputs below -87.3 are clamped (result ~1e-38). n = round(x / ln 2)
// comes from the 1.5 * 2^23 trick, not std::floor, which gcc only vectorises under -fno-trapping-math; and
// the clamp is a ternary, not std::max, which (taking references) kept gcc 12 from vectorising the loop.
// Shared by the CPU kernels (cpu_kernels.py hashes this header into every build).
#pragma once

#include <cstdint>

inline float exp_nonpos(float x) {
  x = x > -87.3f ? x : -87.3f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds |v| < 2^22 to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}
