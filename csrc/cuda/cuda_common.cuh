// Device helpers shared by the CUDA kernels of faststeal._C. Only <torch/types.h> and c10/cuda
// headers are included (ATen/cuda/CUDAContext.h needs cuSPARSE headers this toolkit lacks).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "../common.h"

namespace faststeal {
namespace gpu {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t blocks_for(int64_t n, int64_t threads, int64_t cap = 65535 * 8) {
  const int64_t b = (n + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(b, cap));
}

// Standard normal of element ``index`` (rng.py's Box-Muller). The build uses --use_fast_math,
// which turns logf into the approximate __logf: near u1 = 1 that can return a tiny positive
// number and sqrt a NaN, so the log goes through log1pf (not remapped) of the exact u1 - 1, and
// the cosine through cospif. Agrees with the float32 reference to a few ulp.
__device__ __forceinline__ float normal_dev(uint32_t key, uint64_t index) {
  const float u1 = normal_u1(key, index);
  const float u2 = normal_u2(key, index);
  const float l = log1pf(u1 - 1.0f);  // <= 0
  return sqrtf(fmaxf(-2.0f * l, 0.0f)) * cospif(2.0f * u2);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Warp argmax with ties to the lowest index; every lane gets the result.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t j = __shfl_xor_sync(0xffffffffu, i, o);
    if (w > v || (w == v && j < i)) {
      v = w;
      i = j;
    }
  }
}

// Sum over a block of blockDim.x threads (a multiple of 32, <= 1024); result valid in thread 0.
// Fixed reduction tree, so deterministic.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nwarps ? partial[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace gpu
}  // namespace faststeal

// Dtypes of the CUDA kernels.
#define FS_DISPATCH_CUDA(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, \
                                  __VA_ARGS__)
