// bf16 <-> float32 conversions on raw bits, shared by the CPU kernels (cpu_kernels.py hashes this header
// into every build). Plain bit operations that gcc vectorises in simd loops, and exact in the widening
// direction: a bf16 is the top half of its float32's bits.
#pragma once

#include <cstdint>

inline float bf16_bits_to_float(uint16_t b) { return __builtin_bit_cast(float, static_cast<uint32_t>(b) << 16); }

// rounded to nearest even, as torch rounds; for values known to be finite (a NaN may come out as an infinity)
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// the same, and a NaN stays a (quiet) NaN, as in torch's conversion
inline uint16_t float_to_bf16_bits_keep_nan(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return float_to_bf16_bits(f);
}
