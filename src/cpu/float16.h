// 16-bit floats as stored in tensors (IEEE half, bfloat16), widened to float and narrowed back
// branch-free (round to nearest even; NaN stays NaN, overflow becomes inf), so that loops over
// them vectorize. The CPU kernels load and store every dtype through to_acc / from_acc.
#pragma once

#include <cstdint>
#include <cstring>

#include "../types.h"

namespace inplace_abn {
ABN_ISA_NAMESPACE_BEGIN

struct Float16 {
  uint16_t bits;
};

struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_acc(float v) {
  return v;
}

inline double to_acc(double v) {
  return v;
}

inline float to_acc(BFloat16 v) {
  return float_from_bits(static_cast<uint32_t>(v.bits) << 16);
}

inline float to_acc(Float16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t magnitude = v.bits & 0x7fffu;  // exponent and mantissa
  const uint32_t shifted = magnitude << 13;
  // Normal numbers: rebias the exponent from 15 to 127. Inf and NaN: all exponent bits set.
  uint32_t bits = magnitude >= 0x7c00u ? (shifted | 0x7f800000u) : shifted + 0x38000000u;
  // Subnormals (and zero) are mantissa * 2^-24: computed exactly as (2^-14 + mantissa * 2^-24) - 2^-14.
  const float subnormal = float_from_bits(shifted + 0x38800000u) - float_from_bits(0x38800000u);
  bits = magnitude < 0x0400u ? float_bits(subnormal) : bits;
  return float_from_bits(bits | sign);
}

template <typename T>
inline T from_acc(float v);

template <typename T>
inline T from_acc(double v);

template <>
inline float from_acc<float>(float v) {
  return v;
}

template <>
inline double from_acc<double>(double v) {
  return v;
}

template <>
inline BFloat16 from_acc<BFloat16>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return {static_cast<uint16_t>(v != v ? quiet_nan : rounded)};
}

template <>
inline Float16 from_acc<Float16>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7fffffffu;
  // Half normals: rebias the exponent from 127 to 15 and round the 13 dropped bits to nearest even
  // (a carry into the exponent is the correct rounding, up to inf).
  const uint32_t normal = (magnitude - 0x38000000u + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  // Half subnormals (|v| < 2^-14): in float, |v| + 0.5 has ulp 2^-24, the half subnormal step, so the
  // addition itself rounds to nearest even and leaves the half mantissa in the low bits.
  const uint32_t subnormal = float_bits(float_from_bits(magnitude) + 0.5f) - 0x3f000000u;
  uint32_t bits = magnitude < 0x38800000u ? subnormal : normal;
  bits = magnitude >= 0x47800000u ? (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u) : bits;  // NaN; >= 2^16: inf
  return {static_cast<uint16_t>(bits | sign)};
}

ABN_ISA_NAMESPACE_END
}  // namespace inplace_abn
