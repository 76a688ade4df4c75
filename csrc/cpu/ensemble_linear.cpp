// ensemble_linear on the CPU: the GEMMs go to oneDNN or MKL (detail::stacked_linear in gemm.cpp,
// which also adds the bias and applies relu when there is no dropout); otherwise bias, activation
// and dropout are one fused, parallel epilogue pass, and the backward's
// activation/dropout gradient and bias reduction are one fused prologue pass. The dropout mask
// is regenerated from the key in the backward, never stored. bfloat16/float16 tensors are stored
// in their dtype and computed in float32 (at::opmath_type): the GEMMs accumulate in float32, the
// epilogues load, compute in float32 and round once on store; the bias gradient sums each
// 256-row chunk in float32 (float64 for float64) and the chunks in double.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "vec_math.h"

namespace faststeal {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 14;  // elements per parallel chunk of elementwise passes
constexpr int64_t kRowsPerChunk = 256;    // batch rows per bias-reduction chunk (fixed, so the
                                          // summation order does not depend on the thread count)

template <typename T, Act A>
inline T activate(T v) {
  if constexpr (A == Act::kRelu) return relu_bits(v);
  else if constexpr (A == Act::kGelu) return gelu_cpu(v);
  else return v;
}

// y = dropout(act(src + bias)) for rows [r0, r1) of the (S*B, N) output; src may alias y, and for
// gelu z receives the pre-activation (src may alias z). Dropout counter = linear index of y.
// The inner loop is branch-free (bit-mask relu, integer mask compare) so that it vectorizes;
// compiled for AVX2 and for the baseline ISA (FS_CLONES_AVX2, picked at load time).
template <typename T, Act A, bool kDrop, bool kBias>
FS_CLONES_AVX2
void epilogue_rows(const T* src, T* z, T* y, const T* bias, int64_t r0, int64_t r1, int64_t B,
                   int64_t N, uint32_t key, uint32_t thr, at::opmath_type<T> scale) {
  using C = at::opmath_type<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* bb = kBias ? bias + (r / B) * N : nullptr;
    const int64_t off = r * N;
    const uint32_t c0 = static_cast<uint32_t>(off);
    for (int64_t n = 0; n < N; ++n) {
      C v = static_cast<C>(src[off + n]);
      if constexpr (kBias) v += static_cast<C>(bb[n]);
      if constexpr (A == Act::kGelu) z[off + n] = static_cast<T>(v);
      C a = activate<C, A>(v);
      if constexpr (kDrop) {
        a *= select_bits(dropout_keep(key, c0 + static_cast<uint32_t>(n), thr), scale);
      }
      y[off + n] = static_cast<T>(a);
    }
  }
}

template <typename T, Act A, bool kDrop>
void run_epilogue(const T* src, T* z, T* y, const T* bias, int64_t S, int64_t B, int64_t N,
                  uint32_t key, uint32_t thr, at::opmath_type<T> scale) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(N, 1));
  at::parallel_for(0, S * B, grain, [&](int64_t r0, int64_t r1) {
    if (bias) epilogue_rows<T, A, kDrop, true>(src, z, y, bias, r0, r1, B, N, key, thr, scale);
    else epilogue_rows<T, A, kDrop, false>(src, z, y, bias, r0, r1, B, N, key, thr, scale);
  });
}

template <typename T>
void dispatch_epilogue(Act act, bool drop, const T* src, T* z, T* y, const T* bias, int64_t S,
                       int64_t B, int64_t N, uint32_t key, uint32_t thr,
                       at::opmath_type<T> scale) {
#define FS_EPI(A)                                                                   \
  (drop ? run_epilogue<T, A, true>(src, z, y, bias, S, B, N, key, thr, scale)      \
        : run_epilogue<T, A, false>(src, z, y, bias, S, B, N, key, thr, scale))
  switch (act) {
    case Act::kRelu: FS_EPI(Act::kRelu); break;
    case Act::kGelu: FS_EPI(Act::kGelu); break;
    default: FS_EPI(Act::kNone); break;
  }
#undef FS_EPI
}

// dz = grad_y * act'(.) * mask * scale for batch rows [b0, b1) of member s, written (kWrite) at
// dz + dz_base + dz_row_stride * b (the stacked (S,B,N) or the shared (B,S,N) layout); with
// kBias the bias gradient of those rows is accumulated in opmath into dbias_acc (N). Like
// epilogue_rows, compiled for AVX2 and for the baseline ISA (FS_CLONES_AVX2; float32 sums
// vectorize 8-wide there).
template <typename T, Act A, bool kDrop, bool kWrite, bool kBias>
FS_CLONES_AVX2
void dz_rows(const T* __restrict__ g, const T* __restrict__ y, const T* __restrict__ z,
             T* __restrict__ dz, at::opmath_type<T>* __restrict__ dbias_acc, int64_t s,
             int64_t b0, int64_t b1, int64_t B, int64_t N, int64_t dz_base, int64_t dz_row_stride,
             uint32_t key, uint32_t thr, at::opmath_type<T> scale) {
  using C = at::opmath_type<T>;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t off = (s * B + b) * N;  // index in grad_y / y / z (all (S,B,N))
    const uint32_t c0 = static_cast<uint32_t>(off);
    T* __restrict__ out = kWrite ? dz + dz_base + dz_row_stride * b : nullptr;
    const T* __restrict__ gr = g + off;
    const T* __restrict__ yr = y + off;
    const T* __restrict__ zr = A == Act::kGelu ? z + off : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      C d;
      const C gv = static_cast<C>(gr[n]);
      if constexpr (A == Act::kRelu) {
        // y > 0 iff z > 0 and the element was kept, so relu needs neither z nor the mask.
        d = gv * select_bits(positive_bits(static_cast<C>(yr[n])), scale);
      } else {
        d = A == Act::kGelu ? gv * gelu_grad_cpu(static_cast<C>(zr[n])) : gv;
        if constexpr (kDrop) {
          d *= select_bits(dropout_keep(key, c0 + static_cast<uint32_t>(n), thr), scale);
        }
      }
      if constexpr (kWrite) out[n] = static_cast<T>(d);
      if constexpr (kBias) dbias_acc[n] += d;
    }
  }
}

template <typename T, Act A, bool kDrop>
void run_dz(const T* g, const T* y, const T* z, T* dz, double* dbias_part, int64_t S, int64_t B,
            int64_t N, bool shared, uint32_t key, uint32_t thr, at::opmath_type<T> scale) {
  const int64_t nchunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  // stacked dz (S,B,N): member s, row b at (s*B + b)*N; shared dz (B,S,N): at (b*S + s)*N.
  const int64_t row_stride = shared ? S * N : N;
  at::parallel_for(0, nchunks * S, 1, [&](int64_t t0, int64_t t1) {
    // a chunk's rows accumulate in opmath (float for float32/bf16/fp16: vectorizes), the chunks'
    // partial sums in double
    std::vector<at::opmath_type<T>> acc_buf(dbias_part ? N : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / S, s = t % S;
      const int64_t b0 = chunk * kRowsPerChunk, b1 = std::min(B, b0 + kRowsPerChunk);
      double* part = dbias_part ? dbias_part + (chunk * S + s) * N : nullptr;
      at::opmath_type<T>* acc = part ? acc_buf.data() : nullptr;
      if (acc) std::fill(acc, acc + N, at::opmath_type<T>(0));
      const int64_t base = shared ? s * N : s * B * N;
#define FS_DZ_ROWS(W, BI) \
  dz_rows<T, A, kDrop, W, BI>(g, y, z, dz, acc, s, b0, b1, B, N, base, row_stride, key, thr, scale)
      if (dz && acc) FS_DZ_ROWS(true, true);
      else if (dz) FS_DZ_ROWS(true, false);
      else if (acc) FS_DZ_ROWS(false, true);
#undef FS_DZ_ROWS
      for (int64_t n = 0; part && n < N; ++n) part[n] = static_cast<double>(acc[n]);
    }
  });
}

template <typename T>
void dispatch_dz(Act act, bool drop, const T* g, const T* y, const T* z, T* dz,
                 double* dbias_part, int64_t S, int64_t B, int64_t N, bool shared, uint32_t key,
                 uint32_t thr, at::opmath_type<T> scale) {
#define FS_DZ(A)                                                                            \
  (drop ? run_dz<T, A, true>(g, y, z, dz, dbias_part, S, B, N, shared, key, thr, scale)    \
        : run_dz<T, A, false>(g, y, z, dz, dbias_part, S, B, N, shared, key, thr, scale))
  switch (act) {
    case Act::kRelu: FS_DZ(Act::kRelu); break;
    case Act::kGelu: FS_DZ(Act::kGelu); break;
    default: FS_DZ(Act::kNone); break;
  }
#undef FS_DZ
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ensemble_linear_fwd(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const OptTensor& bias,
                                                       const std::string& activation,
                                                       double dropout_p, int64_t key) {
  const Target t = cpu_target("ensemble_linear_fwd_cpu");
  const LinearDims d = check_ensemble_linear(t, x, weight, bias);
  const Act act = parse_activation(t, activation);
  const uint32_t k = check_key(t, key, "key");
  const uint32_t thr = dropout_threshold(t, dropout_p);
  const bool drop = dropout_p > 0.0;

  if ((act == Act::kNone || act == Act::kRelu) && !drop) {  // bias and relu fused in the GEMM
    return {detail::stacked_linear(x, weight, bias, act == Act::kRelu), x.new_empty({0})};
  }
  // One GEMM into y, or into z for gelu, then one fused pass for bias + activation + dropout
  // (in place for relu/none).
  const at::Tensor acc = detail::stacked_linear(x, weight, std::nullopt, /*relu=*/false);
  at::Tensor y = act == Act::kGelu ? alloc({d.S, d.B, d.N}, x.options()) : acc;
  at::Tensor z = act == Act::kGelu ? acc : x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ensemble_linear_fwd_cpu", [&] {
    const scalar_t* bptr = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* zptr = act == Act::kGelu ? z.data_ptr<scalar_t>() : nullptr;
    dispatch_epilogue<scalar_t>(act, drop, acc.data_ptr<scalar_t>(), zptr, y.data_ptr<scalar_t>(),
                                bptr, d.S, d.B, d.N, k, thr,
                                static_cast<at::opmath_type<scalar_t>>(dropout_scale(dropout_p)));
  });
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& bias, const at::Tensor& y, const at::Tensor& z,
    const std::string& activation, double dropout_p, int64_t key, bool need_dx) {
  const Target t = cpu_target("ensemble_linear_bwd_cpu");
  const LinearDims d = check_ensemble_linear(t, x, weight, bias);
  const Act act = parse_activation(t, activation);
  check_ensemble_linear_bwd(t, d, grad_y, x, y, z, act);
  const uint32_t k = check_key(t, key, "key");
  const uint32_t thr = dropout_threshold(t, dropout_p);
  const bool drop = dropout_p > 0.0;
  const int64_t S = d.S, B = d.B, N = d.N, K = d.K;

  // dz in (S,B,N) for stacked x; in (B,S,N) for shared x so that dx = sum_s dz_s @ W_s and all
  // dW_s are each a single GEMM over the (B, S*N) matrix.
  at::Tensor dz;
  if (act == Act::kNone && !drop && !d.shared) {
    dz = grad_y;  // nothing to fuse: use the incoming gradient as is
  } else {
    dz = d.shared ? alloc({B, S, N}, x.options()) : alloc({S, B, N}, x.options());
  }
  at::Tensor dbias_part;
  const int64_t nchunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  if (bias.has_value()) dbias_part = alloc({nchunks, S, N}, x.options().dtype(at::kDouble));

  const bool dz_is_grad = dz.is_same(grad_y);
  if (!dz_is_grad || bias.has_value()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "ensemble_linear_bwd_cpu", [&] {
      const scalar_t* zptr = act == Act::kGelu ? z.data_ptr<scalar_t>() : nullptr;
      double* dbp = bias.has_value() ? dbias_part.data_ptr<double>() : nullptr;
      scalar_t* dzp = dz_is_grad ? nullptr : dz.data_ptr<scalar_t>();
      dispatch_dz<scalar_t>(act, drop, grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), zptr,
                            dzp, dbp, S, B, N, d.shared, k, thr,
                            static_cast<at::opmath_type<scalar_t>>(dropout_scale(dropout_p)));
    });
  }

  at::Tensor dx = x.new_empty({0}), dw;
  if (d.shared) {
    const at::Tensor dz2 = dz.view({B, S * N});
    if (need_dx) dx = detail::mm(dz2, weight.view({S * N, K}));
    dw = detail::mm(dz2.t(), x).view({S, N, K});
  } else {
    if (need_dx) dx = detail::stacked_linear(dz, weight.transpose(1, 2), std::nullopt, false);
    dw = detail::stacked_linear(dz.transpose(1, 2), x.transpose(1, 2), std::nullopt, false);
  }
  at::Tensor db = bias.has_value() ? dbias_part.sum(0).to(x.scalar_type()) : x.new_empty({0});
  return {dx, dw, db};
}

}  // namespace cpu
}  // namespace faststeal
