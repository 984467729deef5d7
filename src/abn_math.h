// Per-channel formulas of In-Place Activated BatchNorm, shared by the CPU and CUDA kernels.
//
// Notation (per channel, n = number of values per channel):
//   s = |w| + eps (effective scale: keeps the affine step invertible), b = bias
//   invstd = 1 / sqrt(var + eps)
//   forward:  z = s * (x - mean) * invstd + b,   y = act(z)
//   backward: z = act^-1(y), dz = dy * act'(z), xhat = (z - b) / s
//             S1 = sum(dz), S2 = sum(dz * xhat)
//             dx = s * invstd * (dz - S1 / n - xhat * S2 / n)   (training)
//             dx = s * invstd * dz                              (eval: running stats)
//             dweight = sign(w) * S2, dbias = S1
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "types.h"

#if defined(__CUDACC__)
#define ABN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ABN_HOST_DEVICE inline
#endif

namespace inplace_abn {
ABN_ISA_NAMESPACE_BEGIN

// Float and double overloads, on host and (through CUDA's <cmath> wrappers) on device.
using std::expm1;
using std::log;
using std::sqrt;

// Accumulation type: float for float and the 16-bit types, double for double.
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccumulateType<T>::type;

// exp(x) - 1 for x <= 0 and log(x) for x > 0: what ELU and its inverse need. On the CPU the float
// versions are branch-free polynomials so that loops using them vectorize; elsewhere, and for double,
// the standard functions. Range reductions as Cephes' (x = n ln 2 + r; x = 2^k (1 + m)), polynomials
// fitted by scripts/fit_polynomials.py, fewer terms than Cephes' for the same float accuracy: both are
// within 1e-7 relative of the exact value (expm1 near 0 included). They use fused multiply-adds where
// the instruction set has them (ELU results may then differ by an ulp from the portable build).
namespace detail {

#if defined(__FMA__) || (defined(_MSC_VER) && defined(__AVX2__))
inline float poly_step(float acc, float x, float c) {
  return std::fma(acc, x, c);
}
#else
inline float poly_step(float acc, float x, float c) {
  return acc * x + c;
}
#endif

inline float bits_to_float(uint32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// x <= 0 (not NaN): expm1(x) = 2^n (1 + q) - 1 with q = expm1(r) = r + r^2 P(r), |r| <= ln(2) / 2. The
// result is formed as 2^n q + (2^n - 1), exact for n = 0: relative accuracy is kept near x = 0.
inline float cpu_expm1_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // n >= -126: 2^n stays a normal number
  // t = 1.5 * 2^23 + 127 + n: adding the shifter rounds x / ln 2 to the integer n, which lands in the
  // low mantissa bits of t as n + 127 (in [1, 127]); shifted into the exponent field, it is 2^n.
  const float shifter = 12583039.0f;
  const float t = poly_step(x, 1.44269504088896341f, shifter);
  const float n = t - shifter;
  float r = poly_step(n, -0.693359375f, x);  // x - n ln 2, ln 2 in two parts: n * 0.693359375 is exact
  r = poly_step(n, 2.12194440e-4f, r);
  const float scale = bits_to_float(float_to_bits(t) << 23);
  float p = 1.388252131e-3f;
  p = poly_step(p, r, 8.366520517e-3f);
  p = poly_step(p, r, 4.166720062e-2f);
  p = poly_step(p, r, 1.666654348e-1f);
  p = poly_step(p, r, 4.999999702e-1f);
  const float q = poly_step(r * r, p, r);
  return poly_step(scale, q, scale - 1.0f);
}

// x > 0, normal (not NaN or inf): log(x) = k ln 2 + log1p(m), log1p(m) = m - m^2 / 2 + m^3 Q(m).
inline float cpu_log_positive(float x) {
  // Offsetting the bits by those of sqrt(1/2) splits at sqrt(2): x = 2^k (1 + m), 1 + m in [sqrt(1/2), sqrt(2)).
  const uint32_t bits = float_to_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(bits >> 23) - 0x7f);
  const float m = bits_to_float((bits & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float m2 = m * m;
  float q = 8.700430393e-2f;
  q = poly_step(q, m, -1.426748633e-1f);
  q = poly_step(q, m, 1.491476893e-1f);
  q = poly_step(q, m, -1.657758504e-1f);
  q = poly_step(q, m, 1.996306330e-1f);
  q = poly_step(q, m, -2.500133812e-1f);
  q = poly_step(q, m, 3.333390951e-1f);
  float y = poly_step(m * m2, q, k * -2.12194440e-4f);  // k ln 2 in two parts, as in expm1
  y = poly_step(m2, -0.5f, y);
  return poly_step(k, 0.693359375f, m + y);
}

ABN_HOST_DEVICE float expm1_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return expm1f(x);
#else
  return cpu_expm1_nonpositive(x);
#endif
}

ABN_HOST_DEVICE float log_positive(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return cpu_log_positive(x);
#endif
}

ABN_HOST_DEVICE double expm1_nonpositive(double x) {
  return expm1(x);
}

ABN_HOST_DEVICE double log_positive(double x) {
  return log(x);
}

}  // namespace detail

// The activation parameter with its reciprocal precomputed (slope of leaky_relu, alpha of elu).
template <typename acc>
struct ActivationParam {
  acc p;
  acc inv_p;
};

// act(z) and the recovery of (z, dz) from what backward keeps. For Identity, LeakyRelu and Elu
// backward keeps the output y and inverts the activation. Relu (leaky_relu with slope 0, or elu
// with alpha 0) loses z where y = 0, so backward keeps the pre-activation z instead.
//
// NaN propagates as in torch's activations: act(NaN) = NaN, the recovered z of a NaN output is
// NaN, and act'(NaN) is what torch's backward gives: the slope p for leaky_relu (`z > 0` is
// false), 1 for relu (`z <= 0` is false), NaN for elu (torch's vectorized loop; its scalar tail
// gives 1). The selects are written so that a NaN, for which every comparison is false, falls
// through to the NaN operand; still branch-free.
template <Activation act>
struct ActivationOps;

template <>
struct ActivationOps<Activation::Identity> {
  template <typename acc>
  static ABN_HOST_DEVICE acc forward(acc z, ActivationParam<acc>) {
    return z;
  }
  template <typename acc>
  static ABN_HOST_DEVICE void recover(acc y, acc dy, ActivationParam<acc>, acc& z, acc& dz) {
    z = y;
    dz = dy;
  }
};

template <>
struct ActivationOps<Activation::LeakyRelu> {
  template <typename acc>
  // Written as multiplications by a selected factor: branch-free, so loops vectorize.
  static ABN_HOST_DEVICE acc forward(acc z, ActivationParam<acc> a) {
    return z * (z > acc(0) ? acc(1) : a.p);
  }
  template <typename acc>
  static ABN_HOST_DEVICE void recover(acc y, acc dy, ActivationParam<acc> a, acc& z, acc& dz) {
    const bool positive = y > acc(0);
    z = y * (positive ? acc(1) : a.inv_p);
    dz = dy * (positive ? acc(1) : a.p);
  }
};

template <>
struct ActivationOps<Activation::Elu> {
  // Both branches are computed and one selected, so loops vectorize.
  // expm1 only ever sees a number <= 0 (0 for NaN); a NaN z is returned by the final select.
  template <typename acc>
  static ABN_HOST_DEVICE acc forward(acc z, ActivationParam<acc> a) {
    const acc negative = a.p * detail::expm1_nonpositive(z < acc(0) ? z : acc(0));
    return z <= acc(0) ? negative : z;
  }
  // y = alpha * (exp(z) - 1) for z <= 0, so exp(z) = 1 + y / alpha and act'(z) = y + alpha.
  // 1 + y / alpha is clamped away from 0: outputs that rounded to -alpha give a large negative
  // but finite z instead of -inf (their dz is ~0 anyway). A NaN y gives z = NaN and dz = NaN.
  template <typename acc>
  static ABN_HOST_DEVICE void recover(acc y, acc dy, ActivationParam<acc> a, acc& z, acc& dz) {
    const acc ratio = acc(1) + y * a.inv_p;
    const acc floor = std::numeric_limits<acc>::epsilon();
    const acc negative_z = detail::log_positive(ratio > floor ? ratio : floor);
    z = y <= acc(0) ? negative_z : y;
    dz = gradient(y, dy, a);
  }
  // dz alone, from y: what the CPU input gradient needs when the reduction kept z (no second log).
  template <typename acc>
  static ABN_HOST_DEVICE acc gradient(acc y, acc dy, ActivationParam<acc> a) {
    return dy * (y > acc(0) ? acc(1) : y + a.p);
  }
};

template <>
struct ActivationOps<Activation::Relu> {
  template <typename acc>
  static ABN_HOST_DEVICE acc forward(acc z, ActivationParam<acc>) {
    return z <= acc(0) ? acc(0) : z;
  }
  // `saved` is the pre-activation z, not the output.
  template <typename acc>
  static ABN_HOST_DEVICE void recover(acc saved, acc dy, ActivationParam<acc>, acc& z, acc& dz) {
    z = saved;
    dz = saved <= acc(0) ? acc(0) : dy;
  }
};

// Effective affine scale s = |w| + eps (1 without weight).
template <typename acc>
ABN_HOST_DEVICE acc affine_scale(acc weight, bool has_weight, acc eps) {
  return has_weight ? (weight < acc(0) ? -weight : weight) + eps : acc(1);
}

template <typename acc>
ABN_HOST_DEVICE acc inverse_std(acc var, acc eps) {
  return acc(1) / sqrt(var + eps);
}

// Forward, per channel: z = (x - mean) * scale + bias, with scale = s * invstd. Centring first keeps
// z exact for a mean far from 0: x * scale + (bias - mean * scale) would cancel (with mean 1e4 and
// std 1e-2 in float32 the shift is ~1e6, whose rounding alone is an error of 0.03 in z).
template <typename acc>
struct NormalizeCoeffs {
  acc mean;
  acc scale;
  acc bias;
};

// A channel whose scale is not finite (an infinite weight, or var + eps = 0) gets torch's form instead,
// mean 0 and bias - mean * scale, so that its NaN / inf pattern is torch's: x * inf + (b - mean * inf) is
// NaN where (x - mean) * inf + b would be +-inf (and ReLU / ELU then a finite 0 / -alpha).
template <typename acc>
ABN_HOST_DEVICE NormalizeCoeffs<acc> normalize_coeffs(acc mean, acc var, acc s, acc bias, acc eps) {
  const acc scale = s * inverse_std(var, eps);
  const bool finite = scale - scale == acc(0);  // false for +-inf and NaN; no <cmath> call on the device
  return finite ? NormalizeCoeffs<acc>{mean, scale, bias} : NormalizeCoeffs<acc>{acc(0), scale, bias - mean * scale};
}

template <typename acc>
ABN_HOST_DEVICE acc normalize(acc x, acc mean, acc scale, acc bias) {
  return (x - mean) * scale + bias;
}

// Backward, per channel: dx = dz_scale * dz + centered_scale * (z - bias) + offset.
// This is s * invstd * (dz - S1/n - xhat * S2/n) with xhat = (z - bias) / s; in eval mode
// (no batch statistics to differentiate through) centered_scale = offset = 0.
template <typename acc>
struct InputGradCoeffs {
  acc dz_scale;
  acc bias;
  acc centered_scale;
  acc offset;
};

template <typename acc>
ABN_HOST_DEVICE InputGradCoeffs<acc> input_grad_coeffs(
    acc var, acc s, acc bias, acc eps, bool training, acc sum_dz, acc sum_dz_xhat, acc count) {
  const acc dz_scale = s * inverse_std(var, eps);
  if (!training) {
    return {dz_scale, bias, acc(0), acc(0)};
  }
  const acc mean_dz = sum_dz / count;
  const acc mean_dz_xhat = sum_dz_xhat / count;
  return {dz_scale, bias, -dz_scale * mean_dz_xhat / s, -dz_scale * mean_dz};
}

// The centred term is selected, not multiplied by a zero centered_scale (eval mode): a non-finite
// z (a NaN or infinite input element) leaves the eval gradient dz_scale * dz as torch has it.
template <typename acc>
ABN_HOST_DEVICE acc input_grad(InputGradCoeffs<acc> k, acc z, acc dz) {
  const acc centered = k.centered_scale * (z - k.bias);
  return k.dz_scale * dz + (k.centered_scale != acc(0) ? centered : acc(0)) + k.offset;
}

// Running statistics after a training batch, in double: r + momentum * (batch - r), as torch's lerp_
// (momentum = 1 / batches seen for a cumulative average). running_var takes the unbiased batch
// variance, var * unbias_factor(count), count = values per channel (> 1; an empty batch updates nothing).
ABN_HOST_DEVICE double running_update(double running, double batch, double momentum) {
  return running + momentum * (batch - running);
}

ABN_HOST_DEVICE double unbias_factor(int64_t count) {
  return static_cast<double>(count) / static_cast<double>(count - 1);
}

// dweight = sign(w) * S2: d|w|/dw, +1 at w = 0 (and without weight) as the original library.
template <typename acc>
ABN_HOST_DEVICE acc weight_grad(acc weight, acc sum_dz_xhat) {
  return weight < acc(0) ? -sum_dz_xhat : sum_dz_xhat;
}

// Running statistics of a set of values: count, mean and M2 = sum((x - mean)^2).
template <typename acc>
struct Moments {
  acc count;
  acc mean;
  acc m2;
};

// Chan et al.'s parallel merge of two sets' moments: exact in exact arithmetic, and stable
// because it only ever adds centred quantities.
template <typename acc>
ABN_HOST_DEVICE Moments<acc> merge_moments(Moments<acc> a, Moments<acc> b) {
  const acc count = a.count + b.count;
  if (count == acc(0)) {
    return a;
  }
  const acc delta = b.mean - a.mean;
  const acc b_share = b.count / count;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

ABN_ISA_NAMESPACE_END
}  // namespace inplace_abn
