// gaussian_kl on CUDA: sum over elements of KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)) as
// a fused two-launch reduction (fixed grid and tree: deterministic), and the elementwise
// gradient, which reads the incoming scalar gradient on the device (no host sync).
#include "cuda_common.cuh"
#include "ops_cuda.h"

namespace faststeal {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

template <typename T>
__global__ void kl_partial_kernel(const T* __restrict__ mu, const T* __restrict__ rho,
                                  typename Acc<T>::type* __restrict__ part, int64_t n,
                                  typename Acc<T>::type inv_ps) {
  using acc_t = typename Acc<T>::type;
  acc_t acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t ratio = softplus<acc_t>(to_acc(rho[i])) * inv_ps;
    const acc_t mr = to_acc(mu[i]) * inv_ps;
    const acc_t vr = ratio * ratio;
    acc += acc_t(0.5) * (vr + mr * mr - acc_t(1) - log(vr));
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t n) {
  A acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += part[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

template <typename T>
__global__ void kl_grad_kernel(const typename Acc<T>::type* __restrict__ grad,
                               const T* __restrict__ mu, const T* __restrict__ rho,
                               T* __restrict__ dmu, T* __restrict__ drho, int64_t n,
                               typename Acc<T>::type inv_var) {
  using acc_t = typename Acc<T>::type;
  const acc_t g = grad[0];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t r = to_acc(rho[i]);
    const acc_t sigma = softplus<acc_t>(r);
    dmu[i] = static_cast<T>(g * to_acc(mu[i]) * inv_var);
    drho[i] = static_cast<T>(g * (sigma * inv_var - acc_t(1) / sigma) * sigmoid<acc_t>(r));
  }
}

}  // namespace

at::Tensor gaussian_kl_fwd(const at::Tensor& mu, const at::Tensor& rho, double prior_sigma) {
  const Target t = cuda_target("gaussian_kl_fwd_cuda");
  check_gaussian_kl(t, mu, rho, prior_sigma);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int64_t n = mu.numel();
  const auto acc_opts = mu.options().dtype(acc_dtype(mu.scalar_type()));
  at::Tensor out = alloc({}, acc_opts);
  const int64_t nblocks = std::min<int64_t>(kMaxBlocks, blocks_for(n, kThreads * 4));
  at::Tensor part = alloc({nblocks}, acc_opts);
  FS_DISPATCH_CUDA(mu.scalar_type(), "gaussian_kl_fwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    kl_partial_kernel<scalar_t><<<nblocks, kThreads, 0, stream()>>>(
        mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), part.data_ptr<acc_t>(), n,
        static_cast<acc_t>(1.0 / prior_sigma));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials_kernel<acc_t><<<1, 1024, 0, stream()>>>(part.data_ptr<acc_t>(),
                                                         out.data_ptr<acc_t>(), nblocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_bwd(const at::Tensor& grad, const at::Tensor& mu,
                                                   const at::Tensor& rho, double prior_sigma) {
  const Target t = cuda_target("gaussian_kl_bwd_cuda");
  check_gaussian_kl(t, mu, rho, prior_sigma);
  TORCH_CHECK(grad.numel() == 1, t.fn, ": grad must be a scalar, got sizes ", grad.sizes());
  check_device(t, grad, "grad");
  const c10::cuda::CUDAGuard guard(mu.device());
  // .to(device): the kernel reads grad on mu's device (it may come from another GPU).
  const at::Tensor g =
      grad.reshape({}).to(mu.device(), acc_dtype(mu.scalar_type())).contiguous();
  at::Tensor dmu = alloc_like(mu), drho = alloc_like(rho);
  const int64_t n = mu.numel();
  if (n == 0) return {dmu, drho};
  FS_DISPATCH_CUDA(mu.scalar_type(), "gaussian_kl_bwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    kl_grad_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(
        g.data_ptr<acc_t>(), mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(),
        dmu.data_ptr<scalar_t>(), drho.data_ptr<scalar_t>(), n,
        static_cast<acc_t>(1.0 / (prior_sigma * prior_sigma)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dmu, drho};
}

}  // namespace gpu
}  // namespace faststeal
