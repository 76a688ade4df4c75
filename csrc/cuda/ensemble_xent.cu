// ensemble_cross_entropy on CUDA: one warp per (member, row) computes the row's max and
// log-sum-exp offset and its loss ((x_max - x_t) + log sum for hard labels, sum_c t_c ((x_max -
// x_c) + log sum) for soft targets); blocks sum their rows into per-(member, chunk) partials and a
// second launch sums those in a fixed order (deterministic). The backward writes
// (softmax * sum(t) - t) * grad_s / B per row. Out-of-range hard labels give NaN (a device-side
// assert would poison the CUDA context, and a host-side check would need a sync).
#include "cuda_common.cuh"
#include "ops_cuda.h"

namespace faststeal {
namespace gpu {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerBlock = 64;

// Row max and log(sum(exp(x - max))) across the warp (all lanes get them).
template <typename T>
__device__ __forceinline__ void row_stats(const T* row, int64_t C, int lane,
                                          typename Acc<T>::type& m,
                                          typename Acc<T>::type& logsum) {
  using acc_t = typename Acc<T>::type;
  acc_t mx = -INFINITY;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t v = to_acc(row[c]);
    mx = v > mx ? v : mx;
  }
  mx = warp_max(mx);
  acc_t sum = 0;
  for (int64_t c = lane; c < C; c += 32) sum += exp(to_acc(row[c]) - mx);
  sum = warp_sum(sum);
  m = mx;
  logsum = log(sum);
}

template <typename T, bool kSoft>
__global__ void xent_partial_kernel(const T* __restrict__ logits, const T* __restrict__ soft,
                                    const int64_t* __restrict__ labels,
                                    typename Acc<T>::type* __restrict__ part, int64_t B,
                                    int64_t C, int64_t nchunks) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t s = blockIdx.y, chunk = blockIdx.x;
  const int64_t b0 = chunk * kRowsPerBlock;
  const int64_t b1 = b0 + kRowsPerBlock < B ? b0 + kRowsPerBlock : B;
  acc_t acc = 0;  // lane 0 of each warp accumulates its rows
  for (int64_t b = b0 + warp; b < b1; b += kWarps) {
    const T* row = logits + (s * B + b) * C;
    acc_t m, ls;
    row_stats<T>(row, C, lane, m, ls);
    acc_t loss;
    if constexpr (kSoft) {
      const T* tr = soft + b * C;
      acc_t l = 0;
      for (int64_t c = lane; c < C; c += 32) l += to_acc(tr[c]) * ((m - to_acc(row[c])) + ls);
      loss = warp_sum(l);
    } else {
      const int64_t t = labels[b];
      loss = (t >= 0 && t < C) ? (m - to_acc(row[t])) + ls : acc_t(NAN);
    }
    if (lane == 0) acc += loss;
  }
  acc = block_sum(lane == 0 ? acc : acc_t(0));
  if (threadIdx.x == 0) part[s * nchunks + chunk] = acc;
}

template <typename A>
__global__ void xent_finish_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t S,
                                   int64_t nchunks, int64_t B) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= S) return;
  A t = 0;
  for (int64_t k = 0; k < nchunks; ++k) t += part[s * nchunks + k];
  out[s] = t / static_cast<A>(B);
}

template <typename T, bool kSoft>
__global__ void xent_grad_kernel(const typename Acc<T>::type* __restrict__ grad,
                                 const T* __restrict__ logits, const T* __restrict__ soft,
                                 const int64_t* __restrict__ labels, T* __restrict__ dlogits,
                                 int64_t S, int64_t B, int64_t C) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kWarps) + warp;  // row of (S*B)
  if (r >= S * B) return;
  const int64_t s = r / B, b = r % B;
  const T* row = logits + r * C;
  T* drow = dlogits + r * C;
  acc_t m, ls;
  row_stats<T>(row, C, lane, m, ls);
  const acc_t w = grad[s] / static_cast<acc_t>(B);
  if constexpr (kSoft) {
    const T* tr = soft + b * C;
    acc_t ts = 0;
    for (int64_t c = lane; c < C; c += 32) ts += to_acc(tr[c]);
    ts = warp_sum(ts);
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t p = exp((to_acc(row[c]) - m) - ls);
      drow[c] = static_cast<T>((p * ts - to_acc(tr[c])) * w);
    }
  } else {
    const int64_t t = labels[b];
    const bool ok = t >= 0 && t < C;
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t p = exp((to_acc(row[c]) - m) - ls);
      drow[c] = static_cast<T>(ok ? (p - (c == t ? acc_t(1) : acc_t(0))) * w : acc_t(NAN));
    }
  }
}

}  // namespace

at::Tensor ensemble_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target) {
  const Target t = cuda_target("ensemble_cross_entropy_fwd_cuda");
  const bool soft = check_ensemble_xent(t, logits, target);
  TORCH_CHECK(target.device() == logits.device(), t.fn, ": target is on ", target.device(),
              " but logits is on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t S = logits.size(0), B = logits.size(1), C = logits.size(2);
  TORCH_CHECK(S <= 65535, t.fn, ": at most 65535 members are supported, got logits sizes ",
              logits.sizes());  // gridDim.y
  const auto acc_opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor out = alloc({S}, acc_opts);
  if (S == 0) return out;
  if (B == 0) return out.fill_(NAN);
  const int64_t nchunks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor part = alloc({S, nchunks}, acc_opts);
  FS_DISPATCH_CUDA(logits.scalar_type(), "ensemble_cross_entropy_fwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const dim3 grid(nchunks, S);
    if (soft) {
      xent_partial_kernel<scalar_t, true><<<grid, kWarps * 32, 0, stream()>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), nullptr,
          part.data_ptr<acc_t>(), B, C, nchunks);
    } else {
      xent_partial_kernel<scalar_t, false><<<grid, kWarps * 32, 0, stream()>>>(
          logits.data_ptr<scalar_t>(), nullptr, target.data_ptr<int64_t>(),
          part.data_ptr<acc_t>(), B, C, nchunks);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    xent_finish_kernel<acc_t><<<blocks_for(S, 128), 128, 0, stream()>>>(
        part.data_ptr<acc_t>(), out.data_ptr<acc_t>(), S, nchunks, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor ensemble_cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& target) {
  const Target t = cuda_target("ensemble_cross_entropy_bwd_cuda");
  const bool soft = check_ensemble_xent(t, logits, target);
  const int64_t S = logits.size(0), B = logits.size(1), C = logits.size(2);
  check_grad_scalar_per_member(t, grad, S);
  TORCH_CHECK(target.device() == logits.device(), t.fn, ": target is on ", target.device(),
              " but logits is on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  // .to(device): the kernel reads grad on logits' device (it may come from another GPU).
  const at::Tensor g =
      grad.to(logits.device(), acc_dtype(logits.scalar_type())).contiguous();
  at::Tensor dlogits = alloc_like(logits);
  if (S * B == 0) return dlogits;
  FS_DISPATCH_CUDA(logits.scalar_type(), "ensemble_cross_entropy_bwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const dim3 grid((S * B + kWarps - 1) / kWarps);
    if (soft) {
      xent_grad_kernel<scalar_t, true><<<grid, kWarps * 32, 0, stream()>>>(
          g.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), nullptr,
          dlogits.data_ptr<scalar_t>(), S, B, C);
    } else {
      xent_grad_kernel<scalar_t, false><<<grid, kWarps * 32, 0, stream()>>>(
          g.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), nullptr, target.data_ptr<int64_t>(),
          dlogits.data_ptr<scalar_t>(), S, B, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dlogits;
}

}  // namespace gpu
}  // namespace faststeal
