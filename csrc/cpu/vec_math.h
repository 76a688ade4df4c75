// Branch-free float math for the CPU kernels, written so that GCC auto-vectorizes the loops that
// use it without -ffast-math. Under the default -ftrapping-math GCC will not if-convert a
// floating-point compare-and-select, so clamps, signs and relu masks work on the bit patterns
// (integer compares and masks) instead. NaN propagates through every helper, whatever its sign
// bit (inf - inf is 0xFFC00000 on x86): bit tricks must not treat it as a large negative number.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

// FS_X86_GCC: GCC on x86-64, where the kernels may compile functions for an ISA extension
// (#pragma GCC target, target_clones) and ask the CPU at run time (__builtin_cpu_supports).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FS_X86_GCC 1
#endif

// FS_CLONES_AVX2: compile a function for AVX2 and for the baseline x86-64 ISA, picked at load time
// (GCC target_clones, an ifunc: glibc/ELF only; clang does not clone templates). AVX2 without FMA:
// no contraction, so both clones compute bit-identical results. Elsewhere: the baseline only.
#if defined(FS_X86_GCC) && defined(__GLIBC__)
#define FS_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define FS_CLONES_AVX2
#endif

// FS_INLINE: a helper inlined into its (cloned) caller, so it is compiled for the clone's ISA
#define FS_INLINE inline __attribute__((always_inline))

namespace faststeal {
namespace cpu {

#ifdef FS_X86_GCC
// Whether this CPU has AVX2 and FMA (asked once per process): the kernels compiled under
// #pragma GCC target("avx2,fma") may run.
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// All-ones if x is a NaN (any sign: x86 produces inf - inf as the sign-bit NaN 0xFFC00000),
// else 0: an integer compare on the magnitude bits.
inline uint32_t nan_mask(float x) {
  return 0u - static_cast<uint32_t>((float_to_bits(x) & 0x7FFFFFFFu) > 0x7F800000u);
}

// exp(x) for x <= 0: Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2/2; relative error
// ~2e-7. Below -87 (-inf included; for x <= 0 a larger magnitude is a larger bit pattern) the
// result is +0 rather than a subnormal: an absolute error below 1.2e-38, and exactly 0 for -inf
// so that 0 * log 0 terms can be dropped. A NaN of either sign is returned as is.
inline float exp_nonpos(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t nan = nan_mask(x);
  const uint32_t under = (0u - static_cast<uint32_t>(u > 0xC2AE0000u)) & ~nan;
  x = bits_to_float(u & ~(nan | under));  // the polynomial runs on 0 for NaN / underflow
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2**22)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  p *= bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return bits_to_float((float_to_bits(p) & ~(nan | under)) | (u & nan));
}

// log(x) for x > 0 (Cephes' logf, ~1 ulp); x below FLT_MIN (zero or subnormal) is treated as
// FLT_MIN, which is what x * log(x) -> 0 needs. +inf and NaN are returned as is.
inline float log_pos(float x) {
  const uint32_t x_bits = float_to_bits(x);
  const uint32_t special = 0u - static_cast<uint32_t>((x_bits & 0x7FFFFFFFu) >= 0x7F800000u);
  uint32_t u = x_bits & ~special;  // the polynomial runs on FLT_MIN for inf / NaN
  u = u > 0x00800000u ? u : 0x00800000u;
  int32_t e = static_cast<int32_t>(u >> 23) - 127;
  const uint32_t mant = u & 0x007FFFFFu;
  // m in [sqrt(1/2), sqrt(2)): mantissas above sqrt(2)'s (0x3504F3) are halved.
  const uint32_t big = mant > 0x3504F3u ? 1u : 0u;
  e += static_cast<int32_t>(big);
  const float m = bits_to_float(mant | ((127u - big) << 23));
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  const float r = (f + y) + ef * 0.693359375f;
  return bits_to_float((float_to_bits(r) & ~special) | (x_bits & special));
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the approximation ATen's own
// vectorized float erf (and so the eager float32 GELU on CPU) uses.
inline float erf_fast(float x) {
  const uint32_t ux = float_to_bits(x);
  const uint32_t sign = ux & 0x80000000u;
  const float ax = bits_to_float(ux ^ sign);
  const float t = 1.0f / (0.3275911f * ax + 1.0f);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float v = 1.0f - r * t * exp_nonpos(-ax * ax);
  return bits_to_float(float_to_bits(v) ^ sign);
}

// Exact-erf GELU and its derivative: the fast float path, std::erf in double (gradcheck).
// gelu(+-inf) is NaN as in the reference (F.gelu's float32 result): + (z - z) adds 0 to a finite
// z and NaN to an infinite one (GCC keeps it: no -ffinite-math-only).
inline float gelu_cpu(float z) {
  return 0.5f * z * (1.0f + erf_fast(z * 0.70710678118654752f)) + (z - z);
}
inline double gelu_cpu(double z) {
  return 0.5 * z * (1.0 + std::erf(z * 0.70710678118654752440)) + (z - z);
}
inline float gelu_grad_cpu(float z) {
  const float cdf = 0.5f * (1.0f + erf_fast(z * 0.70710678118654752f));
  return cdf + z * exp_nonpos(-0.5f * z * z) * 0.39894228040143267794f;
}
inline double gelu_grad_cpu(double z) {
  const double cdf = 0.5 * (1.0 + std::erf(z * 0.70710678118654752440));
  return cdf + z * std::exp(-0.5 * z * z) * 0.39894228040143267794;
}

// v if cond else +0, by masking the bits: unlike cond ? v : 0.0f this vectorizes.
inline float select_bits(bool cond, float v) {
  return bits_to_float(float_to_bits(v) & (0u - static_cast<uint32_t>(cond)));
}
inline double select_bits(bool cond, double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  b &= 0ull - static_cast<uint64_t>(cond);
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// x > 0 from the sign/magnitude bits, an integer compare: false for a NaN of either sign
// (as x > 0 is), the relu gradient's mask.
inline bool positive_bits(float x) {
  return float_to_bits(x) - 1u < 0x7F800000u;  // bits in [1, 0x7F800000]: +denormal .. +inf
}
inline bool positive_bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b - 1u < 0x7FF0000000000000ull;
}

// relu by masking the bits: x for x > 0 and for a NaN of either sign (torch.relu keeps NaN), +0
// otherwise (no -inf * 0 NaNs).
inline float relu_bits(float x) {
  const uint32_t b = float_to_bits(x);
  const bool keep = (b & 0x7FFFFFFFu) > 0x7F800000u || static_cast<int32_t>(b) > 0;
  return bits_to_float(b & (0u - static_cast<uint32_t>(keep)));
}
inline double relu_bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  const bool keep = (b & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull ||
                    static_cast<int64_t>(b) > 0;
  b &= 0ull - static_cast<uint64_t>(keep);
  double r;
  std::memcpy(&r, &b, sizeof(r));
  return r;
}

// cos(2 pi u) for u in [0, 1) (the Box-Muller angle): with x = u - 1/2, cos(2 pi u) =
// -cos(2 pi |x|); |x| in (1/4, 1/2] folds to 1/2 - |x| with the sign flipped, leaving an angle in
// [0, pi/2] for the Taylor series to theta^14 (truncation < 1e-10; float rounding ~1e-7).
inline float cos_2pi(float u) {
  const float a = bits_to_float(float_to_bits(u - 0.5f) & 0x7FFFFFFFu);
  const uint32_t big = float_to_bits(a) > 0x3E800000u ? 0xFFFFFFFFu : 0u;  // a > 0.25
  const float b = bits_to_float((float_to_bits(a) & ~big) | (float_to_bits(0.5f - a) & big));
  const float th = 6.28318530717958647692f * b;
  const float t = th * th;
  float c = -1.1470745597729725e-11f;
  c = c * t + 2.08767569878680990e-09f;
  c = c * t - 2.75573192239858907e-07f;
  c = c * t + 2.48015873015873016e-05f;
  c = c * t - 1.38888888888888889e-03f;
  c = c * t + 4.16666666666666667e-02f;
  c = c * t - 0.5f;
  c = c * t + 1.0f;
  return bits_to_float(float_to_bits(c) ^ (~big & 0x80000000u));
}

// The counter RNG's standard normal (csrc/common.h: normal_host) with branch-free polynomial
// log and cos instead of libm calls, ~10x faster and auto-vectorizable; agrees with normal_host
// and the reference to float32 rounding (~1e-6 relative). Every CPU use of eps goes through it,
// so forward and backward regenerate identical samples.
inline float normal_fast(uint32_t key, uint64_t index) {
  const float r2 = relu_bits(-2.0f * log_pos(normal_u1(key, index)));
  return std::sqrt(r2) * cos_2pi(normal_u2(key, index));
}

}  // namespace cpu
}  // namespace faststeal
