// ensemble_linear on CUDA: the GEMMs go to cuBLAS through at::bmm / at::mm; bias, activation and
// dropout are one fused epilogue kernel (which also un-permutes the shared-x GEMM output), and
// the backward's activation/dropout gradient and bias reduction are one fused prologue kernel.
// The dropout mask is regenerated from the key in the backward, never stored. Math in float
// (double for double), storage in the input dtype.
#include "cuda_common.cuh"
#include "ops_cuda.h"

namespace faststeal {
namespace gpu {
namespace {

constexpr int kThreads = 256;

template <typename T, Act A>
__device__ __forceinline__ T activate(T v) {
  if constexpr (A == Act::kRelu) return v < T(0) ? T(0) : v;  // keeps NaN, like torch.relu
  else if constexpr (A == Act::kGelu) return gelu<T>(v);
  else return v;
}

// y[s,b,n] = dropout(act(src + bias[s,n])); src is (S,B,N), or (B,S,N) when kSrcBSN (the
// shared-x GEMM output). src may alias z or y (same element, read before written).
template <typename T, Act A, bool kDrop, bool kBias, bool kSrcBSN>
__global__ void epilogue_kernel(const T* src, T* z, T* y, const T* __restrict__ bias, int64_t S,
                                int64_t B, int64_t N, uint32_t key, uint32_t thr,
                                typename Acc<T>::type scale) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = S * B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i % N, sb = i / N;
    const int64_t s = sb / B, b = sb % B;
    const int64_t si = kSrcBSN ? (b * S + s) * N + n : i;
    acc_t v = to_acc(src[si]);
    if constexpr (kBias) v += to_acc(bias[s * N + n]);
    if constexpr (A == Act::kGelu) z[i] = static_cast<T>(v);
    acc_t a = activate<acc_t, A>(v);
    // a dropped NaN stays NaN (nan * 0), as in the reference
    if constexpr (kDrop) a *= dropout_keep(key, static_cast<uint32_t>(i), thr) ? scale : acc_t(0);
    y[i] = static_cast<T>(a);
  }
}

// dz = grad_y * act'(.) * mask * scale for member blockIdx.y, columns blockIdx.x*32 + tx, rows
// of split blockIdx.z; written (when kWrite) in the (S,B,N) or, for shared x, (B,S,N) layout.
// With kBias the column sums over the split's rows go to part[(split, s, n)] (fixed tree:
// deterministic).
template <typename T, Act A, bool kDrop, bool kBias, bool kWrite>
__global__ void dz_kernel(const T* __restrict__ g, const T* __restrict__ y,
                          const T* __restrict__ z, T* __restrict__ dz,
                          typename Acc<T>::type* __restrict__ part, int64_t S, int64_t B,
                          int64_t N, int64_t rows_per_split, bool dz_bsn, uint32_t key,
                          uint32_t thr, typename Acc<T>::type scale) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t red[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n = blockIdx.x * 32 + tx, s = blockIdx.y, split = blockIdx.z;
  const int64_t b0 = split * rows_per_split;
  const int64_t b1 = b0 + rows_per_split < B ? b0 + rows_per_split : B;
  acc_t acc = 0;
  if (n < N) {
    for (int64_t b = b0 + ty; b < b1; b += 8) {
      const int64_t i = (s * B + b) * N + n;
      const acc_t gv = to_acc(g[i]);
      acc_t d;
      if constexpr (A == Act::kRelu) {
        // y > 0 iff z > 0 and the element was kept: relu needs neither z nor the mask.
        d = gv * (to_acc(y[i]) > acc_t(0) ? scale : acc_t(0));  // a NaN gv stays NaN
      } else {
        d = A == Act::kGelu ? gv * gelu_grad<acc_t>(to_acc(z[i])) : gv;
        if constexpr (kDrop) {
          d *= dropout_keep(key, static_cast<uint32_t>(i), thr) ? scale : acc_t(0);
        }
      }
      const T dt = static_cast<T>(d);
      if constexpr (kWrite) dz[dz_bsn ? (b * S + s) * N + n : i] = dt;
      if constexpr (kBias) acc += to_acc(dt);
    }
  }
  if constexpr (kBias) {
    red[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && n < N) {
      acc_t t = red[0][tx];
#pragma unroll
      for (int k = 1; k < 8; ++k) t += red[k][tx];
      part[(split * S + s) * N + n] = t;
    }
  }
}

template <typename T>
__global__ void sum_splits_kernel(const typename Acc<T>::type* __restrict__ part,
                                  T* __restrict__ out, int64_t nsplit, int64_t SN) {
  // Grid-stride: blocks_for caps the grid, so one thread may own several outputs.
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < SN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    typename Acc<T>::type t = 0;
    for (int64_t k = 0; k < nsplit; ++k) t += part[k * SN + i];
    out[i] = static_cast<T>(t);
  }
}

template <typename T, Act A, bool kDrop>
void launch_epilogue(bool bias_, bool bsn, const T* src, T* z, T* y, const T* bias, int64_t S,
                     int64_t B, int64_t N, uint32_t key, uint32_t thr,
                     typename Acc<T>::type scale) {
  const int64_t total = S * B * N;
  if (total == 0) return;
  const dim3 grid(blocks_for(total, kThreads));
#define FS_LAUNCH(KB, KP) \
  epilogue_kernel<T, A, kDrop, KB, KP><<<grid, kThreads, 0, stream()>>>(src, z, y, bias, S, B, \
                                                                         N, key, thr, scale)
  if (bias_) {
    if (bsn) FS_LAUNCH(true, true); else FS_LAUNCH(true, false);
  } else {
    if (bsn) FS_LAUNCH(false, true); else FS_LAUNCH(false, false);
  }
#undef FS_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Act A, bool kDrop>
void launch_dz(bool bias_, bool write, const T* g, const T* y, const T* z, T* dz,
               typename Acc<T>::type* part, int64_t S, int64_t B, int64_t N, int64_t nsplit,
               int64_t rows_per_split, bool bsn, uint32_t key, uint32_t thr,
               typename Acc<T>::type scale) {
  if (S * B * N == 0) return;
  TORCH_CHECK(S <= 65535, "ensemble_linear_bwd_cuda: at most 65535 members are supported "
              "(weight has ", S, ")");  // gridDim.y
  const dim3 block(32, 8);
  const dim3 grid((N + 31) / 32, S, nsplit);
#define FS_LAUNCH(KB, KW)                                                                     \
  dz_kernel<T, A, kDrop, KB, KW><<<grid, block, 0, stream()>>>(g, y, z, dz, part, S, B, N,   \
                                                               rows_per_split, bsn, key, thr, \
                                                               scale)
  if (bias_) {
    if (write) FS_LAUNCH(true, true); else FS_LAUNCH(true, false);
  } else {
    FS_LAUNCH(false, true);
  }
#undef FS_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FS_ACT_DROP_SWITCH(ACT, DROP, FN, ...)                                  \
  switch (ACT) {                                                                \
    case Act::kRelu:                                                            \
      if (DROP) FN<scalar_t, Act::kRelu, true>(__VA_ARGS__);                    \
      else FN<scalar_t, Act::kRelu, false>(__VA_ARGS__);                        \
      break;                                                                    \
    case Act::kGelu:                                                            \
      if (DROP) FN<scalar_t, Act::kGelu, true>(__VA_ARGS__);                    \
      else FN<scalar_t, Act::kGelu, false>(__VA_ARGS__);                        \
      break;                                                                    \
    default:                                                                    \
      if (DROP) FN<scalar_t, Act::kNone, true>(__VA_ARGS__);                    \
      else FN<scalar_t, Act::kNone, false>(__VA_ARGS__);                        \
      break;                                                                    \
  }

}  // namespace

std::tuple<at::Tensor, at::Tensor> ensemble_linear_fwd(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const OptTensor& bias,
                                                       const std::string& activation,
                                                       double dropout_p, int64_t key) {
  const Target t = cuda_target("ensemble_linear_fwd_cuda");
  const LinearDims d = check_ensemble_linear(t, x, weight, bias);
  const Act act = parse_activation(t, activation);
  const uint32_t k = check_key(t, key, "key");
  const uint32_t thr = dropout_threshold(t, dropout_p);
  const bool drop = dropout_p > 0.0;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = d.S, B = d.B, N = d.N, K = d.K;

  at::Tensor y = alloc({S, B, N}, x.options());
  at::Tensor z = act == Act::kGelu ? alloc({S, B, N}, x.options()) : x.new_empty({0});
  if (!d.shared && act == Act::kNone && !drop) {
    // Nothing to fuse: cuBLAS applies the bias as beta * C.
    if (bias.has_value()) at::baddbmm_out(y, bias->unsqueeze(1), x, weight.transpose(1, 2));
    else at::bmm_out(y, x, weight.transpose(1, 2));
    return {y, z};
  }
  // Shared x: one GEMM (B,K) x (K, S*N) -> (B, S*N) that the epilogue un-permutes; stacked x:
  // batched GEMM into y (or z for gelu), then the epilogue in place.
  at::Tensor src;
  if (d.shared) {
    src = at::mm(x, weight.view({S * N, K}).t());
  } else {
    src = act == Act::kGelu ? z : y;
    at::bmm_out(src, x, weight.transpose(1, 2));
  }
  FS_DISPATCH_CUDA(x.scalar_type(), "ensemble_linear_fwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* bptr = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* zptr = act == Act::kGelu ? z.data_ptr<scalar_t>() : nullptr;
    FS_ACT_DROP_SWITCH(act, drop, launch_epilogue, bias.has_value(), d.shared,
                       src.data_ptr<scalar_t>(), zptr, y.data_ptr<scalar_t>(), bptr, S, B, N, k,
                       thr, static_cast<acc_t>(dropout_scale(dropout_p)));
  });
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& bias, const at::Tensor& y, const at::Tensor& z,
    const std::string& activation, double dropout_p, int64_t key, bool need_dx) {
  const Target t = cuda_target("ensemble_linear_bwd_cuda");
  const LinearDims d = check_ensemble_linear(t, x, weight, bias);
  const Act act = parse_activation(t, activation);
  check_ensemble_linear_bwd(t, d, grad_y, x, y, z, act);
  const uint32_t k = check_key(t, key, "key");
  const uint32_t thr = dropout_threshold(t, dropout_p);
  const bool drop = dropout_p > 0.0;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = d.S, B = d.B, N = d.N, K = d.K;

  // dz in (S,B,N) for stacked x, (B,S,N) for shared x (then dx and all dW_s are single GEMMs).
  const bool passthrough = act == Act::kNone && !drop && !d.shared;
  at::Tensor dz = passthrough ? grad_y
                              : (d.shared ? alloc({B, S, N}, x.options())
                                          : alloc({S, B, N}, x.options()));
  at::Tensor db = x.new_empty({0});
  if (!passthrough || bias.has_value()) {
    // Split the rows so that the grid has ~512 blocks; the split count depends on the shapes
    // only, so the bias sums are reproducible.
    const int64_t col_blocks = ((N + 31) / 32) * S;
    const int64_t nsplit = std::max<int64_t>(
        1, std::min<int64_t>((B + 31) / 32, (512 + col_blocks - 1) / col_blocks));
    const int64_t rows_per_split = (B + nsplit - 1) / nsplit;
    at::Tensor part;
    if (bias.has_value()) {
      part = alloc({nsplit, S, N}, x.options().dtype(acc_dtype(x.scalar_type())));
      db = alloc({S, N}, x.options());
    }
    FS_DISPATCH_CUDA(x.scalar_type(), "ensemble_linear_bwd_cuda", [&] {
      using acc_t = typename Acc<scalar_t>::type;
      const scalar_t* zptr = act == Act::kGelu ? z.data_ptr<scalar_t>() : nullptr;
      acc_t* pp = bias.has_value() ? part.data_ptr<acc_t>() : nullptr;
      FS_ACT_DROP_SWITCH(act, drop, launch_dz, bias.has_value(), !passthrough,
                         grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), zptr,
                         passthrough ? nullptr : dz.data_ptr<scalar_t>(), pp, S, B, N, nsplit,
                         rows_per_split, d.shared, k, thr,
                         static_cast<acc_t>(dropout_scale(dropout_p)));
      if (bias.has_value() && S * N > 0) {
        if (B == 0) {
          db.zero_();
        } else {
          sum_splits_kernel<scalar_t><<<blocks_for(S * N, kThreads), kThreads, 0, stream()>>>(
              pp, db.data_ptr<scalar_t>(), nsplit, S * N);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }

  at::Tensor dx = x.new_empty({0}), dw;
  if (d.shared) {
    const at::Tensor dz2 = dz.view({B, S * N});
    if (need_dx) dx = at::mm(dz2, weight.view({S * N, K}));
    dw = at::mm(dz2.t(), x).view({S, N, K});
  } else {
    if (need_dx) dx = at::bmm(dz, weight);
    dw = at::bmm(dz.transpose(1, 2), x);
  }
  return {dx, dw, db};
}

}  // namespace gpu
}  // namespace faststeal
