// Shared by the C++ CPU and CUDA kernels of faststeal._C: the counter-based RNG of
// faststeal/ops/rng.py (bit-exact), small numerics helpers, and the input checks.
//
// The RNG and math helpers are plain functions usable from host and device code; the checks use
// ATen and are host-only.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace faststeal {

// ---------------------------------------------------------------------------------------------
// Counter-based RNG (faststeal/ops/rng.py). Every backend must reproduce these bit-exactly.
// ---------------------------------------------------------------------------------------------

// MurmurHash3's 32-bit finaliser.
FS_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// bits(c) = fmix32(fmix32(c ^ key) ^ key); counters are taken modulo 2**32.
FS_HD uint32_t random_bits(uint32_t key, uint32_t counter) {
  return fmix32(fmix32(counter ^ key) ^ key);
}

// Dropout keeps an element iff (bits >> 8) >= threshold: an integer comparison, so masks are
// bit-identical across backends.
FS_HD bool dropout_keep(uint32_t key, uint32_t counter, uint32_t threshold) {
  return (random_bits(key, counter) >> 8) >= threshold;
}

// Box-Muller uniforms of element index i (counters 2i and 2i+1, modulo 2**32).
// u1 in (0, 1], u2 in [0, 1); both exact in float32 (24 bits).
FS_HD float normal_u1(uint32_t key, uint64_t index) {
  return static_cast<float>((random_bits(key, static_cast<uint32_t>(2u * index)) >> 8) + 1u) *
         5.9604644775390625e-08f;  // 2**-24
}
FS_HD float normal_u2(uint32_t key, uint64_t index) {
  return static_cast<float>(random_bits(key, static_cast<uint32_t>(2u * index + 1u)) >> 8) *
         5.9604644775390625e-08f;
}

// Standard normal of element ``index`` in float32: sqrt(-2 ln u1) * cos(2 pi u2). The reference
// evaluates the same expression with torch's float32 log/cos, so samples agree to float32
// rounding (a few ulp), not bit-exactly; the CUDA code has its own device version (fast-math
// safe, see csrc/cuda/cuda_common.cuh).
inline float normal_host(uint32_t key, uint64_t index) {
  const float u1 = normal_u1(key, index);
  const float u2 = normal_u2(key, index);
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.28318530717958647692f * u2);
}

// ---------------------------------------------------------------------------------------------
// Numerics shared by the ops (float or double; device code gets CUDA's global overloads).
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
#define FS_STD
#else
#define FS_STD std
#endif

// torch's softplus with threshold 20 and its derivative.
template <typename T>
FS_HD T softplus(T r) {
  return r > T(20) ? r : FS_STD::log1p(FS_STD::exp(r));
}
template <typename T>
FS_HD T sigmoid(T r) {
  return T(1) / (T(1) + FS_STD::exp(-r));
}

// Exact (erf) GELU and its derivative; gelu(+-inf) is NaN, as in the reference.
template <typename T>
FS_HD T gelu(T z) {
  if (FS_STD::isinf(z)) return T(NAN);
  return T(0.5) * z * (T(1) + FS_STD::erf(z * T(0.70710678118654752440)));
}
template <typename T>
FS_HD T gelu_grad(T z) {
  const T cdf = T(0.5) * (T(1) + FS_STD::erf(z * T(0.70710678118654752440)));
  const T pdf = FS_STD::exp(T(-0.5) * z * z) * T(0.39894228040143267794);
  return cdf + z * pdf;
}

enum class Act : int { kNone = 0, kRelu = 1, kGelu = 2 };

}  // namespace faststeal

// ---------------------------------------------------------------------------------------------
// Host-side input checks (both the CPU and the CUDA entry points validate with these; the
// definitions live in csrc/checks.cpp so they are compiled once).
// ---------------------------------------------------------------------------------------------
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

namespace faststeal {

// bfloat16 / float16: the CPU ops run their elementwise passes in float32 on these (and the
// upcast GEMM path multiplies them as float32).
inline bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }
inline bool is_reduced(const at::Tensor& t) { return is_reduced(t.scalar_type()); }

// Which device and dtypes an entry point accepts.
struct Target {
  const char* fn;               // entry point name, prefixes every message
  c10::DeviceType device;       // kCPU or kCUDA
  std::vector<at::ScalarType> dtypes;
};
Target cpu_target(const char* fn);
Target cuda_target(const char* fn);

// A float tensor of the target's device/dtypes, given rank(s), contiguous; names it on failure.
void check_float(const Target& t, const at::Tensor& x, const char* name,
                 std::initializer_list<int64_t> ranks);
// Same device and dtype as ``ref``.
void check_like(const Target& t, const at::Tensor& x, const char* name, const at::Tensor& ref,
                const char* ref_name);
void check_contiguous(const Target& t, const at::Tensor& x, const char* name);
void check_device(const Target& t, const at::Tensor& x, const char* name);
void check_size(const Target& t, const at::Tensor& x, const char* name, int64_t dim,
                int64_t expected, const char* what);

// Output allocation. With poisoning on (the tests switch it on through
// faststeal._C._set_poison_outputs), floating outputs start as NaN and integer ones as a
// sentinel, so an element a kernel forgets to write shows up instead of passing by luck.
void set_poison_outputs(bool on);
at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor alloc_like(const at::Tensor& t);

Act parse_activation(const Target& t, const std::string& activation);
uint32_t check_key(const Target& t, int64_t key, const char* name);
uint32_t dropout_threshold(const Target& t, double p);
// float32-rounded 1 / (1 - p), the scale the reference multiplies kept elements by.
double dropout_scale(double p);
at::ScalarType acc_dtype(at::ScalarType dtype);

struct LinearDims {
  int64_t S, B, N, K;
  bool shared;  // x is (B, K), shared by all members
};
// x (S,B,K) or (B,K); weight (S,N,K); bias (S,N) or none.
LinearDims check_ensemble_linear(const Target& t, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias);
// grad_y (S,B,N) and y; z (S,B,N) for gelu, else anything (unused).
void check_ensemble_linear_bwd(const Target& t, const LinearDims& d, const at::Tensor& grad_y,
                               const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                               Act act);
// x (S,B,K) or (B,K); w_mu, w_rho (N,K); b_mu, b_rho (N) or none.
LinearDims check_bayes_linear(const Target& t, const at::Tensor& x, const at::Tensor& w_mu,
                              const at::Tensor& w_rho, const std::optional<at::Tensor>& b_mu,
                              const std::optional<at::Tensor>& b_rho, int64_t samples);
void check_gaussian_kl(const Target& t, const at::Tensor& mu, const at::Tensor& rho,
                       double prior_sigma);
// logits (S,B,C) non-empty; targets (B,) int64 or none.
void check_member_stats(const Target& t, const at::Tensor& logits,
                        const std::optional<at::Tensor>& targets);
// logits (S,B,C); target (B,) int64 or (B,C) of logits' dtype. Returns true for soft targets.
bool check_ensemble_xent(const Target& t, const at::Tensor& logits, const at::Tensor& target);
void check_grad_scalar_per_member(const Target& t, const at::Tensor& grad, int64_t S);

}  // namespace faststeal
